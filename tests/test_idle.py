"""The idle order: least recently active first, at the resolution of a coarse clock."""

from __future__ import annotations

from atlax.idle import IdleClock, IdleOrder


def test_the_idlest_is_the_one_that_moved_bytes_longest_ago() -> None:
    clock = IdleClock()
    order: IdleOrder[str] = IdleOrder(clock)
    for name in ("a", "b", "c"):
        order.add(name)
        clock.advance()
    assert order.idlest(0) == ("a", 3)
    order.touch("a")  # a moves bytes now: b is the idlest
    assert order.idlest(0) == ("b", 2)
    assert order.idlest(3) is None  # nobody has been idle that long
    order.discard("b")
    order.discard("b")
    order.touch("b")  # gone: touching it does not bring it back
    assert order.idlest(0) == ("c", 1) and len(order) == 2
    assert list(order) == ["c", "a"]


def test_an_empty_order_has_no_idlest() -> None:
    assert IdleOrder[str](IdleClock()).idlest(0) is None
