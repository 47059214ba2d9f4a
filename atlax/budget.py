"""The relay's budget for buffered bytes (pure bookkeeping, no sockets).

A stream holds, in the relay's memory, the bytes its agent sent that its public client has not
taken yet: at most the stream's window. Windows start small and grow only for clients that keep
up (see MuxStream), so a client that never reads holds little. The budget bounds the sum over
every stream: when bytes arrive that take the relay over it, the streams whose clients have gone
longest without taking a byte are closed until it is back within, so the memory goes to readers.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from .idle import IdleClock, IdleOrder


class Holder(Protocol):
    def evict(self) -> None:
        """Close the stream (and so drop what it holds); its `release` follows."""


H = TypeVar("H", bound=Holder)


class BufferBudget(Generic[H]):
    __slots__ = ("_holders", "clock", "evictions", "held", "limit")

    def __init__(self, limit: int, clock: IdleClock) -> None:
        self.limit = limit
        self.clock = clock
        self.held = 0
        self.evictions = 0
        self._holders: IdleOrder[H] = IdleOrder(clock)  # holding bytes, longest undrained first

    @property
    def room_to_grow(self) -> bool:
        """Windows may grow while the relay holds less than half its budget."""
        return self.held * 2 < self.limit

    # `held` itself is added to and taken from by the holders, as a plain int on the data path;
    # the calls below happen only when a holder starts or stops holding, or once per tick.

    def holding(self, holder: H) -> None:
        """`holder` holds bytes now (it held none)."""
        self._holders.add(holder)

    def drained(self, holder: H) -> None:
        """Some of the holder's bytes left for its socket (at most once per clock tick)."""
        self._holders.touch(holder)

    def emptied(self, holder: H) -> None:
        """The holder holds nothing any more."""
        self._holders.discard(holder)

    def release(self, holder: H, n: int) -> None:
        """The holder is gone with `n` bytes it still held."""
        self.held -= n
        self._holders.discard(holder)

    def enforce(self) -> int:
        """Over the limit: evict the holders that drained longest ago until within it."""
        evicted = 0
        while self.held > self.limit:
            found = self._holders.idlest(0)
            if found is None:
                break
            holder = found[0]
            self._holders.discard(holder)
            holder.evict()
            evicted += 1
        self.evictions += evicted
        return evicted
