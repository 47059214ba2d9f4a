"""The UDP flow table on a fake clock: limits per port and per source, idle expiry in order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlax.flows import FlowRefusal, FlowTable

A1 = ("192.0.2.1", 1000)
A2 = ("192.0.2.1", 1001)
B1 = ("198.51.100.7", 53)


def test_limits_per_port_and_per_source() -> None:
    flows: FlowTable[tuple[str, int], str] = FlowTable(30.0, max_flows=2, max_per_source=1)
    assert flows.refusal("192.0.2.1") is None
    flows.add(A1, "192.0.2.1", "a1", now=0.0)
    assert flows.refusal("192.0.2.1") is FlowRefusal.SOURCE_LIMIT
    with pytest.raises(ValueError, match="source_limit"):
        flows.add(A2, "192.0.2.1", "a2", now=0.0)
    flows.add(B1, "198.51.100.7", "b1", now=0.0)
    assert flows.refusal("203.0.113.9") is FlowRefusal.PORT_LIMIT
    assert flows.pop(A1) == "a1" and flows.pop(A1) is None
    flows.add(A2, "192.0.2.1", "a2", now=1.0)  # the source's count went down with the pop
    assert sorted(flows.flows()) == ["a2", "b1"] and flows.get(A2) == "a2"


def test_idle_flows_expire_oldest_first_and_touch_postpones() -> None:
    flows: FlowTable[tuple[str, int], str] = FlowTable(30.0, max_flows=10, max_per_source=10)
    assert flows.deadline() is None and flows.expire(1e9) == []
    flows.add(A1, "192.0.2.1", "a1", now=0.0)
    flows.add(A2, "192.0.2.1", "a2", now=5.0)
    flows.add(B1, "198.51.100.7", "b1", now=10.0)
    flows.touch(A1, now=20.0)  # a reply passed on a1
    assert flows.deadline() == 35.0  # a2 is now the least recently active
    assert flows.expire(34.9) == []
    assert flows.expire(40.0) == ["a2", "b1"]
    assert flows.deadline() == 50.0 and flows.expire(50.0) == ["a1"]
    assert len(flows) == 0 and flows.refusal("192.0.2.1") is None


def test_a_clock_that_steps_back_never_shortens_a_flows_life() -> None:
    flows: FlowTable[str, str] = FlowTable(10.0, max_flows=10, max_per_source=10)
    flows.add("x", "s", "x", now=100.0)
    flows.touch("x", now=50.0)
    assert flows.deadline() == 110.0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "touch", "pop", "expire"]), st.integers(0, 5), st.floats(0, 5)
        ),
        max_size=60,
    )
)
def test_counts_stay_consistent(ops: list[tuple[str, int, float]]) -> None:
    """Whatever happens, per-source counts match the flows and every flow has its deadline."""
    flows: FlowTable[int, int] = FlowTable(3.0, max_flows=4, max_per_source=2)
    now = 0.0
    for op, key, step in ops:
        now += step
        source = key % 3
        if op == "add" and flows.get(key) is None and flows.refusal(source) is None:
            flows.add(key, source, key, now)
        elif op == "touch":
            flows.touch(key, now)
        elif op == "pop":
            flows.pop(key)
        elif op == "expire":
            for flow in flows.expire(now):
                assert flows.get(flow) is None
            deadline = flows.deadline()
            assert deadline is None or deadline > now
        assert len(flows) <= 4
        for source in range(3):
            count = sum(1 for flow in flows.flows() if flow % 3 == source)
            assert count <= 2
            assert (flows.refusal(source) is FlowRefusal.SOURCE_LIMIT) == (
                count == 2 and len(flows) < 4
            )
