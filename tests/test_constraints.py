"""constraints.txt pins the complete closure of what the images install (atlax[operator,fast]).

Checked against the installed distributions' metadata: hack/setup installs the venv with the same
constraints, so the dependency tree read here is the tree of the pinned versions.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE_EXTRAS = "atlax[operator,fast]"  # what Dockerfile installs; Dockerfile.agent installs less


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def closure(root: str) -> dict[str, str]:
    """name -> installed version of every distribution `root` pulls in, markers evaluated here."""
    found: dict[str, str] = {}
    todo = [Requirement(root)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise AssertionError(f"{name} is not installed: run hack/setup") from None
        found[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    found.pop("atlax")
    return found


def test_constraints_pin_the_complete_closure_of_the_image() -> None:
    pins, needed = pinned(), closure(IMAGE_EXTRAS)
    missing = sorted(f"{n}=={v}" for n, v in needed.items() if n not in pins)
    assert not missing, f"constraints.txt leaves these unpinned: {missing}"
    unused = sorted(set(pins) - set(needed))
    assert not unused, f"constraints.txt pins what {IMAGE_EXTRAS} does not install: {unused}"
    stale = sorted(f"{n}: {v} installed" for n, v in needed.items() if pins[n] != v)
    assert not stale, f"the venv is not installed with constraints.txt (run hack/setup): {stale}"
