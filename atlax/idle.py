"""Which public connection has been idle the longest, in O(1) (pure bookkeeping, no sockets).

When a port, an agent or the relay is at its connection limit, the relay makes room by closing
the connection in that scope that has moved no byte for the longest, instead of refusing the
newcomer: a slowloris that holds idle connections cannot lock real clients out. Activity is
recorded at the resolution of a coarse clock (`IdleClock`, advanced once a second), so a busy
connection costs one integer comparison per read and at most one reordering per second.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class IdleClock:
    """Seconds since the relay started, advanced by the relay's one-second timer."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0

    def advance(self) -> None:
        self.now += 1


class IdleOrder(Generic[T]):
    """Members ordered by last activity, least recently active first."""

    __slots__ = ("_clock", "_last")

    def __init__(self, clock: IdleClock) -> None:
        self._clock = clock
        self._last: OrderedDict[T, int] = OrderedDict()

    @property
    def clock(self) -> IdleClock:
        return self._clock

    def __len__(self) -> int:
        return len(self._last)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._last))

    def add(self, member: T) -> None:
        self._last[member] = self._clock.now
        self._last.move_to_end(member)

    def touch(self, member: T) -> None:
        """`member` moved bytes now (callers do this at most once per clock tick)."""
        if member in self._last:
            self._last[member] = self._clock.now
            self._last.move_to_end(member)

    def discard(self, member: T) -> None:
        self._last.pop(member, None)

    def idlest(self, min_idle: int) -> tuple[T, int] | None:
        """The member idle the longest and for how many ticks, if at least `min_idle`."""
        for member, last in self._last.items():
            idle = self._clock.now - last
            return (member, idle) if idle >= min_idle else None
        return None
