"""The UDP flow table on a fake clock: idle expiry in order, activity postpones it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlax.flows import FlowTable

A1 = ("192.0.2.1", 1000)
A2 = ("192.0.2.1", 1001)
B1 = ("198.51.100.7", 53)


def test_idle_flows_expire_oldest_first_and_touch_postpones() -> None:
    flows: FlowTable[tuple[str, int], str] = FlowTable(30.0)
    assert flows.deadline() is None and flows.expire(1e9) == []
    flows.add(A1, "a1", now=0.0)
    flows.add(A2, "a2", now=5.0)
    flows.add(B1, "b1", now=10.0)
    with pytest.raises(KeyError):
        flows.add(B1, "again", now=10.0)
    flows.touch(A1, now=20.0)  # a reply passed on a1
    assert flows.deadline() == 35.0  # a2 is now the least recently active
    assert flows.expire(34.9) == []
    assert flows.expire(40.0) == ["a2", "b1"]
    assert flows.get(A2) is None and flows.get(A1) == "a1"
    assert flows.deadline() == 50.0 and flows.expire(50.0) == ["a1"]
    assert len(flows) == 0


def test_a_clock_that_steps_back_never_shortens_a_flows_life() -> None:
    flows: FlowTable[str, str] = FlowTable(10.0)
    flows.add("x", "x", now=100.0)
    flows.touch("x", now=50.0)
    assert flows.deadline() == 110.0
    assert flows.pop("x") == "x" and flows.pop("x") is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "touch", "pop", "expire"]), st.integers(0, 5), st.floats(0, 5)
        ),
        max_size=60,
    )
)
def test_expiry_agrees_with_the_rule_written_out(ops: list[tuple[str, int, float]]) -> None:
    """Against a plain dict of last-activity times: a flow expires exactly when idle for the
    timeout, and the deadline is the earliest of those."""
    flows: FlowTable[int, int] = FlowTable(3.0)
    last: dict[int, float] = {}
    now = 0.0
    for op, key, step in ops:
        now += step
        if op == "add" and key not in last:
            flows.add(key, key, now)
            last[key] = now
        elif op == "touch" and key in last:
            flows.touch(key, now)
            last[key] = now
        elif op == "pop":
            assert flows.pop(key) == (key if key in last else None)
            last.pop(key, None)
        elif op == "expire":
            expired = flows.expire(now)
            assert sorted(expired) == sorted(k for k, t in last.items() if t + 3.0 <= now)
            for k in expired:
                del last[k]
        assert sorted(flows.flows()) == sorted(last)
        assert flows.deadline() == (min(last.values()) + 3.0 if last else None)
