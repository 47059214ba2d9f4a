"""The hostname rule and the table: exact first, then the longest wildcard; case, dots, IDNs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlax.sniff import HostnameTable, InvalidHostnameError, normalize_hostname, parse_pattern


def table(*patterns: str) -> HostnameTable[str]:
    out: HostnameTable[str] = HostnameTable()
    for pattern in patterns:
        out.add(parse_pattern(pattern), pattern)
    return out


def test_exact_before_wildcard_and_longest_wildcard_first() -> None:
    routes = table("nas.example.com", "*.example.com", "*.home.example.com")
    assert routes.lookup("nas.example.com") == "nas.example.com"
    assert routes.lookup("photos.example.com") == "*.example.com"
    assert routes.lookup("photos.home.example.com") == "*.home.example.com"
    assert routes.lookup("a.b.home.example.com") == "*.home.example.com"
    assert routes.lookup("x.nas.example.com") == "*.example.com"  # a wildcard, not nas's name


def test_a_wildcard_never_matches_its_own_suffix_or_other_domains() -> None:
    routes = table("*.example.com")
    assert routes.lookup("example.com") is None
    assert routes.lookup("badexample.com") is None
    assert routes.lookup("a.example.org") is None
    assert routes.lookup("a.example.com") == "*.example.com"


def test_names_compare_without_case_or_a_trailing_dot() -> None:
    routes = table("NAS.Example.com.")
    assert list(routes) == ["nas.example.com"]
    assert routes.lookup(normalize_hostname("nas.EXAMPLE.com.")) == "NAS.Example.com."


def test_unicode_names_in_a_config_are_a_labels() -> None:
    assert parse_pattern("bücher.example") == "xn--bcher-kva.example"
    assert parse_pattern("*.Bücher.example") == "*.xn--bcher-kva.example"
    assert parse_pattern("xn--bcher-kva.example") == "xn--bcher-kva.example"
    routes = table("bücher.example")
    assert routes.lookup(normalize_hostname("xn--bcher-kva.example")) == "bücher.example"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("*", "only allowed as the whole first label"),
        ("*example.com", "only allowed as the whole first label"),
        ("a.*.example.com", "only allowed as the whole first label"),
        ("*.*.example.com", "only allowed as the whole first label"),
        ("", "empty"),
        (".", "empty"),
        ("a..b", "label ''"),
        ("-a.example", "label '-a'"),
        ("a b.example", "label 'a b'"),
        ("a" * 64 + ".example", "1-63 characters"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("192.0.2.1", "IP address"),
        ("::1", "IP address"),
        ("\u2603.example", "not a valid IDN"),  # a snowman: no symbols in IDNA 2008
    ],
)
def test_bad_patterns_say_what_is_wrong(pattern: str, message: str) -> None:
    with pytest.raises(InvalidHostnameError, match=message.replace("*", r"\*")) as info:
        parse_pattern(pattern)
    assert "\n" not in str(info.value)


def test_wire_names_must_be_ascii() -> None:
    with pytest.raises(InvalidHostnameError, match="not ASCII"):
        normalize_hostname("bücher.example")


def test_each_pattern_once() -> None:
    routes = table("a.example", "*.example")
    with pytest.raises(ValueError, match="already routed"):
        routes.add("*.example", "other")
    assert routes.remove("*.example") == "*.example"
    assert routes.lookup("b.example") is None
    assert "a.example" in routes and "*.example" not in routes and len(routes) == 1
    routes.add("*.example", "again")
    assert routes.get("*.example") == "again" and routes.get("b.example") is None


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


@given(name=NAME, patterns=st.lists(NAME, max_size=6), wild=st.lists(st.booleans(), max_size=6))
def test_lookup_agrees_with_the_rule_written_out(
    name: str, patterns: list[str], wild: list[bool]
) -> None:
    """The table against a slow literal reading of the rule: exact, else the longest suffix."""
    routes: HostnameTable[str] = HostnameTable()
    written = {("*." + p if w else p) for p, w in zip(patterns, wild + [False] * 6, strict=False)}
    for pattern in written:
        routes.add(pattern, pattern)
    if name in written:
        expected: str | None = name
    else:
        suffixes = [p[2:] for p in written if p.startswith("*.") and name.endswith("." + p[2:])]
        expected = "*." + max(suffixes, key=len) if suffixes else None
    assert routes.lookup(name) == expected
