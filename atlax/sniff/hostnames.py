"""The one hostname rule for routing, and the table that maps names to routes.

Decisions (docs/routing.md says the same for users):
- Names compare case-insensitively: everything is lowercased ASCII.
- One trailing dot is ignored: "nas.example.com." is "nas.example.com" (RFC 6066 forbids the dot
  in SNI, yet some clients send it, and it is legal in an HTTP Host).
- A name is 1..253 characters in labels of 1..63 of [a-z0-9_-], no label starting or ending with
  "-" (RFC 1123, plus "_", which private DNS names use).
- On the wire (SNI, Host) a name must already be ASCII: an internationalized name arrives as
  A-labels ("xn--bcher-kva.example"), and other bytes are refused, never guessed at. In a
  configuration a Unicode name is accepted and turned into those A-labels with IDNA 2008 and the
  UTS #46 mapping (the `idna` package), so "bücher.example" and "xn--bcher-kva.example" are the
  same name.
- An IP address literal is not a hostname (RFC 6066 forbids it in SNI; an HTTP Host of an IP
  address routes nowhere).
- A wildcard is "*." and a name: it stands for one label or more, so "*.example.com" matches
  "a.example.com" and "a.b.example.com" but never "example.com" itself. Lookups try the exact
  name first, then the longest wildcard: for "nas.home.example.com", "*.home.example.com" wins
  over "*.example.com".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Generic, TypeVar

import idna

MAX_NAME = 253
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
WILDCARD = "*."

T = TypeVar("T")


class InvalidHostnameError(ValueError):
    """Not a hostname under the rule above; the message names the text and what is wrong."""


def normalize_hostname(name: str) -> str:
    """A name as a client sent it (ASCII), in the form the table compares: lowercase, no dot."""
    if not name.isascii():
        raise InvalidHostnameError(f"hostname {name!r} is not ASCII (IDNs are sent as xn--)")
    text = name[:-1] if name.endswith(".") else name
    text = text.lower()
    if not text:
        raise InvalidHostnameError("hostname is empty")
    if len(text) > MAX_NAME:
        raise InvalidHostnameError(f"hostname of {len(text)} characters is longer than {MAX_NAME}")
    if is_ip_literal(text):
        raise InvalidHostnameError(f"{name!r} is an IP address, not a hostname")
    for label in text.split("."):
        if not _LABEL.fullmatch(label):
            raise InvalidHostnameError(
                f"hostname {name!r} has a label {label!r} that is not 1-63 characters of "
                "[a-z0-9_-] (no leading or trailing '-')"
            )
    return text


def parse_pattern(text: str) -> str:
    """A hostname or "*.name" from a configuration (Unicode allowed), in table form."""
    suffix = text[len(WILDCARD) :] if text.startswith(WILDCARD) else text
    if "*" in suffix:
        raise InvalidHostnameError(
            f"hostname {text!r}: a wildcard is only allowed as the whole first label, "
            "like *.example.com"
        )
    if not suffix.isascii():
        try:
            suffix = idna.encode(suffix, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidHostnameError(f"hostname {text!r} is not a valid IDN: {exc}") from None
    name = normalize_hostname(suffix)
    return WILDCARD + name if text.startswith(WILDCARD) else name


def is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class HostnameTable(Generic[T]):
    """Patterns (names and wildcards, in `parse_pattern` form) to routes; each pattern once."""

    def __init__(self) -> None:
        self._exact: dict[str, T] = {}
        self._wildcards: dict[str, T] = {}  # keyed by the name after "*."

    def _side(self, pattern: str) -> tuple[dict[str, T], str]:
        if pattern.startswith(WILDCARD):
            return self._wildcards, pattern[len(WILDCARD) :]
        return self._exact, pattern

    def add(self, pattern: str, route: T) -> None:
        """Route `pattern` to `route`; a pattern already in the table is a ValueError."""
        table, key = self._side(pattern)
        if key in table:
            raise ValueError(f"hostname {pattern!r} is already routed")
        table[key] = route

    def remove(self, pattern: str) -> T | None:
        table, key = self._side(pattern)
        return table.pop(key, None)

    def get(self, pattern: str) -> T | None:
        """The route of exactly this pattern (not a lookup: "*.a.b" is not "x.a.b")."""
        table, key = self._side(pattern)
        return table.get(key)

    def lookup(self, name: str) -> T | None:
        """The route for a normalized name: exact first, then the longest matching wildcard."""
        route = self._exact.get(name)
        if route is not None or not self._wildcards:
            return route
        dot = name.find(".")
        while dot != -1:
            route = self._wildcards.get(name[dot + 1 :])
            if route is not None:
                return route
            dot = name.find(".", dot + 1)
        return None

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcards)

    def __contains__(self, pattern: object) -> bool:
        return isinstance(pattern, str) and self.get(pattern) is not None

    def __iter__(self) -> Iterator[str]:
        yield from self._exact
        yield from (WILDCARD + key for key in self._wildcards)
