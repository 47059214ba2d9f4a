"""The operator's port and hostname ownership on the relay's Service, as pure claims."""

from __future__ import annotations

import json

from atlax_operator.claims import (
    HOSTNAMES_ANNOTATION,
    PORTS_ANNOTATION,
    Claims,
    Holdings,
)

A, B = "ns/a", "ns/b"


def claims(*services: dict[str, object]) -> Claims:
    return Claims.of(services)


def tls(port: int, *hostnames: str) -> dict[str, object]:
    return {"name": "site", "port": port, "route": "tls", "hostnames": list(hostnames)}


def test_claims_of_a_spec() -> None:
    c = claims(
        {"name": "smb", "port": 445},
        {"name": "dns", "port": 53, "protocol": "udp"},
        tls(443, "nas.example.com"),
        {"name": "photos", "port": 443, "route": "tls", "hostnames": ["*.photos.example.com"]},
    )
    assert c.ports == {"445", "53/udp"}
    assert c.shared == {443: ("tls", frozenset({"nas.example.com", "*.photos.example.com"}))}
    assert c.service_ports() == {(445, "TCP"), (53, "UDP"), (443, "TCP")}


def test_ports_of_ones_own_and_their_owners() -> None:
    held = Holdings.read({}, [(7443, "TCP")]).claim(A, claims({"name": "smb", "port": 445}))
    assert held.conflict(A, claims({"name": "smb", "port": 445})) is None
    taken = held.conflict(B, claims({"name": "files", "port": 445}))
    assert taken is not None and str(taken) == "port 445 is already used by TunnelAgent ns/a"
    # The same number as UDP is another port; the Service's own port is nobody's to take.
    assert held.conflict(B, claims({"name": "q", "port": 445, "protocol": "udp"})) is None
    own = held.conflict(B, claims({"name": "x", "port": 7443}))
    assert own is not None and "the Service's own port 7443" in str(own)


def test_hostnames_on_a_shared_port() -> None:
    held = Holdings.read({}, []).claim(A, claims(tls(443, "nas.example.com")))
    held = held.claim(B, claims(tls(443, "*.office.example.com")))
    assert held.managed() == {(443, "TCP")}
    taken = held.conflict("ns/c", claims(tls(443, "nas.example.com")))
    assert taken is not None and taken.owner == A
    assert (
        str(taken) == "hostname 'nas.example.com' on port 443 is already used by TunnelAgent ns/a"
    )
    http = {"name": "w", "port": 443, "route": "http", "hostnames": ["w.example.com"]}
    mixed = held.conflict("ns/c", claims(http))
    assert mixed is not None and str(mixed) == (
        "port 443 routes by 'tls' (TunnelAgent ns/a), not 'http'"
    )
    alone = held.conflict("ns/c", claims({"name": "x", "port": 443}))
    assert alone is not None and str(alone) == "port 443 is already used by TunnelAgent ns/a"
    # And the other way round: a port of one's own blocks sharing.
    own = Holdings.read({}, []).claim(A, claims({"name": "web", "port": 443}))
    assert str(own.conflict(B, claims(tls(443, "b.example")))) == (
        "port 443 is already used by TunnelAgent ns/a"
    )


def test_annotations_round_trip_and_release() -> None:
    held = (
        Holdings.read({"other": "kept"}, [(7443, "TCP")])
        .claim(
            A, claims(tls(443, "nas.example.com"), {"name": "dns", "port": 53, "protocol": "udp"})
        )
        .claim(B, claims(tls(443, "wiki.example.com")))
    )
    annotations = held.annotate({"other": "kept"})
    assert annotations["other"] == "kept"
    assert json.loads(annotations[PORTS_ANNOTATION]) == {"53/udp": A}
    assert json.loads(annotations[HOSTNAMES_ANNOTATION]) == {
        "443": {"route": "tls", "hostnames": {"nas.example.com": A, "wiki.example.com": B}}
    }
    ports = [(7443, "TCP"), (443, "TCP"), (53, "UDP")]
    again = Holdings.read(annotations, ports)
    assert again == held and again.unmanaged == {(7443, "TCP")}
    released = again.release(A)
    assert released.managed() == {(443, "TCP")}  # B still shares it
    gone = released.release(B)
    assert gone.managed() == set()
    assert HOSTNAMES_ANNOTATION not in gone.annotate(annotations)  # no empty leftovers


def test_annotations_from_before_hostnames_are_read() -> None:
    """A Service written by an operator from before hostnames: bare port numbers, TCP."""
    held = Holdings.read({PORTS_ANNOTATION: '{"445": "ns/a"}'}, [(445, "TCP"), (7443, "TCP")])
    assert held.ports == {"445": A} and held.unmanaged == {(7443, "TCP")}
    assert held.conflict(A, claims({"name": "smb", "port": 445})) is None


def test_garbage_annotations_hold_nothing() -> None:
    held = Holdings.read({PORTS_ANNOTATION: "not json", HOSTNAMES_ANNOTATION: "[1]"}, [])
    assert held.ports == {} and held.shared == {}
