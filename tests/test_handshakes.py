"""The agent port's handshake caps as bookkeeping: per-source refusal, oldest-first eviction."""

from __future__ import annotations

import ipaddress

from atlax.handshakes import HandshakeGate, Verdict, source_of


def test_a_source_over_its_cap_is_refused_and_others_are_not() -> None:
    gate = HandshakeGate(total=10, per_source=2)
    a, b = source_of("192.0.2.1"), source_of("192.0.2.2")
    assert gate.admit(1, a).verdict is Verdict.ADMITTED
    assert gate.admit(2, a).verdict is Verdict.ADMITTED
    assert gate.admit(3, a).verdict is Verdict.REFUSED
    assert gate.admit(4, b).verdict is Verdict.ADMITTED
    gate.done(1)
    gate.done(1)  # idempotent
    assert gate.admit(5, a).verdict is Verdict.ADMITTED
    assert len(gate) == 3


def test_over_the_total_the_oldest_pending_handshake_makes_room() -> None:
    gate = HandshakeGate(total=3, per_source=10)
    for token in range(3):
        assert gate.admit(token, source_of(f"198.51.100.{token}")).evicted is None
    admission = gate.admit("new", source_of("203.0.113.9"))
    assert admission.verdict is Verdict.ADMITTED and admission.evicted == 0
    assert gate.admit("newer", source_of("203.0.113.9")).evicted == 1
    assert len(gate) == 3
    gate.done(0)  # the evicted one finishing later changes nothing
    assert len(gate) == 3


def test_sources_are_ipv4_addresses_and_ipv6_slash_64s() -> None:
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9")
    assert source_of("2001:db8:1:2::1") == ipaddress.IPv6Network("2001:db8:1:2::/64")
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == ipaddress.IPv4Address("192.0.2.7")
    assert source_of("not an address") is None
    gate = HandshakeGate(total=10, per_source=1)
    assert gate.admit(1, source_of("2001:db8::1")).verdict is Verdict.ADMITTED
    assert gate.admit(2, source_of("2001:db8::2")).verdict is Verdict.REFUSED
