"""The relay's buffer budget as bookkeeping: holders that drained longest ago go first."""

from __future__ import annotations

import os

import anyio
import anyio.abc
import pytest
from conftest import (
    Pki,
    agent_settings,
    free_port,
    relay_settings,
    running_agent,
    running_relay,
    spec,
    tcp_service,
    wait_until,
)

from atlax.agent import Agent
from atlax.budget import BufferBudget
from atlax.idle import IdleClock
from atlax.relay import Relay
from atlax.relay.admission import STREAM_WINDOW_MAX, STREAM_WINDOW_START


class Holder:
    def __init__(self, budget: BufferBudget[Holder], name: str) -> None:
        self.budget = budget
        self.name = name
        self.held = 0
        self.evicted = False

    def take(self, n: int) -> None:
        self.budget.held += n
        if not self.held:
            self.budget.holding(self)
        self.held += n

    def drain(self, n: int) -> None:
        self.budget.held -= n
        self.held -= n
        if self.held:
            self.budget.drained(self)
        else:
            self.budget.emptied(self)

    def evict(self) -> None:
        self.evicted = True
        self.budget.release(self, self.held)
        self.held = 0


def test_over_the_limit_the_holder_that_drained_longest_ago_is_evicted() -> None:
    clock = IdleClock()
    budget: BufferBudget[Holder] = BufferBudget(100, clock)
    stalled, slow, fast = (Holder(budget, n) for n in ("stalled", "slow", "fast"))
    stalled.take(40)
    clock.advance()
    slow.take(40)
    clock.advance()
    slow.drain(10)  # slow drains a little now: it moves behind stalled
    fast.take(20)
    assert budget.held == 90 and budget.room_to_grow is False
    assert budget.enforce() == 0  # within the limit: nobody goes
    fast.take(30)  # 120 > 100
    assert budget.enforce() == 1
    assert stalled.evicted and not slow.evicted and not fast.evicted
    assert budget.held == 80 and budget.evictions == 1


def test_drained_holders_leave_the_order_and_growth_needs_half_the_budget_free() -> None:
    clock = IdleClock()
    budget: BufferBudget[Holder] = BufferBudget(100, clock)
    a = Holder(budget, "a")
    a.take(40)
    assert budget.room_to_grow
    a.drain(40)
    a.take(60)
    assert not budget.room_to_grow
    a.drain(60)
    budget.held += 200  # no holder left to evict: enforce gives up instead of spinning
    assert budget.enforce() == 0


# -- windows through a real relay ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_reader_that_keeps_up_grows_its_window_and_a_stalled_one_does_not(
    pki: Pki,
) -> None:
    """A client that downloads as fast as it can takes its stream's window from 64 KiB to
    1 MiB; a client that never reads keeps the 64 KiB it started with."""
    size = 64 << 20

    async def source(stream: anyio.abc.SocketStream) -> None:
        block = os.urandom(1 << 20)
        async with stream:
            try:
                for _ in range(size >> 20):
                    await stream.send(block)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    port = free_port()
    settings = relay_settings(pki)
    relay = Relay(settings, [spec("home-nas", dl=port)])
    async with (
        tcp_service(source) as src,
        running_relay(relay),
        running_agent(Agent(agent_settings(pki, settings), {"dl": src})),
    ):
        state = relay.registry.get("home-nas")
        assert state is not None
        # The agent is up once it sent JOIN; the relay's side, once it has read it.
        await wait_until(lambda: state.session is not None, 10)
        session = state.session
        assert session is not None

        def windows() -> list[int]:
            return [session.conn.receive_window(s.stream_id) for s in session.streams]

        async with await anyio.connect_tcp("127.0.0.1", port):  # never reads
            await wait_until(lambda: bool(windows()), 10)
            [stalled_id] = [s.stream_id for s in session.streams]
            async with await anyio.connect_tcp("127.0.0.1", port) as reader:
                seen, got = 0, 0
                with anyio.fail_after(120):
                    while got < size:
                        got += len(await reader.receive(1 << 20))
                        seen = max([seen, *windows()])
            assert seen == STREAM_WINDOW_MAX
            assert session.conn.receive_window(stalled_id) == STREAM_WINDOW_START
