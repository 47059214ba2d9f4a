"""The relay's buffer budget as bookkeeping: holders that drained longest ago go first."""

from __future__ import annotations

from atlax.budget import BufferBudget
from atlax.idle import IdleClock


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
