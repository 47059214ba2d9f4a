"""The UDP flows of one public port: client address to flow, idle ones expired.

docs/protocol.md, "Datagram streams": every client address (IP and port) that sends to a public
UDP port is a flow, carried as one datagram stream; a flow that has seen no datagram either way for
the idle timeout ends. This table is the bookkeeping behind that, pure like the protocol core:
time is an argument, and the shell asks `deadline()` when to call `expire(now)` (one timer per
port, re-armed, as aioquic does for a connection). How many flows a port and a source address may
have is the relay's refusal policy, the same as for TCP connections.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # the client's address, as the socket reports it
F = TypeVar("F")  # whatever carries the flow (the shell's datagram stream)


@dataclass(slots=True)
class _Entry(Generic[F]):
    flow: F
    last: float


class FlowTable(Generic[K, F]):
    """Flows by client address, least recently active first."""

    def __init__(self, idle_timeout: float) -> None:
        if idle_timeout <= 0:
            raise ValueError("a flow table needs a positive idle timeout")
        self.idle_timeout = idle_timeout
        self._flows: OrderedDict[K, _Entry[F]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, key: K) -> F | None:
        entry = self._flows.get(key)
        return None if entry is None else entry.flow

    def flows(self) -> list[F]:
        return [entry.flow for entry in self._flows.values()]

    def add(self, key: K, flow: F, now: float) -> None:
        """A new flow; a key already in the table is a bug."""
        if key in self._flows:
            raise KeyError(f"flow {key!r} exists")
        self._flows[key] = _Entry(flow, now)

    def touch(self, key: K, now: float) -> None:
        """A datagram passed on the flow (either way): its idle time starts again."""
        entry = self._flows.get(key)
        if entry is not None:
            entry.last = max(entry.last, now)
            self._flows.move_to_end(key)

    def pop(self, key: K) -> F | None:
        entry = self._flows.pop(key, None)
        return None if entry is None else entry.flow

    def deadline(self) -> float | None:
        """When the least recently active flow goes idle (None without flows)."""
        oldest = next(iter(self._flows.values()), None)
        return None if oldest is None else oldest.last + self.idle_timeout

    def expire(self, now: float) -> list[F]:
        """Remove and return the flows idle for the timeout at `now`, oldest first."""
        expired: list[F] = []
        while self._flows:
            key, entry = next(iter(self._flows.items()))
            if entry.last + self.idle_timeout > now:
                break
            del self._flows[key]
            expired.append(entry.flow)
        return expired
