"""The UDP flows of one public port: client address to flow, bounded, idle ones expired.

docs/protocol.md, "Datagram streams": every client address (IP and port) that sends to a public
UDP port is a flow, carried as one datagram stream; a flow that has seen no datagram either way for
the idle timeout ends. This table is the bookkeeping behind that, pure like the protocol core:
time is an argument, and the shell asks `deadline()` when to call `expire(now)` (one timer per
port, re-armed, as aioquic does for a connection).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)  # the client's address, as the socket reports it
F = TypeVar("F")  # whatever carries the flow (the shell's stream)


class FlowRefusal(enum.StrEnum):
    """Why a new flow is not admitted; the values are the relay's refusal labels."""

    PORT_LIMIT = "port_limit"  # the port has max_flows flows
    SOURCE_LIMIT = "source_limit"  # the client's IP has max_per_source flows on this port


@dataclass(slots=True)
class _Entry(Generic[F]):
    flow: F
    source: Hashable
    last: float


class FlowTable(Generic[K, F]):
    """Flows by client address, least recently active first."""

    def __init__(self, idle_timeout: float, max_flows: int, max_per_source: int) -> None:
        if idle_timeout <= 0 or max_flows < 1 or max_per_source < 1:
            raise ValueError("a flow table needs a positive idle timeout and limits")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.max_per_source = max_per_source
        self._flows: OrderedDict[K, _Entry[F]] = OrderedDict()
        self._per_source: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, key: K) -> F | None:
        entry = self._flows.get(key)
        return None if entry is None else entry.flow

    def flows(self) -> list[F]:
        return [entry.flow for entry in self._flows.values()]

    def refusal(self, source: Hashable) -> FlowRefusal | None:
        """Why a new flow from `source` (the client's IP) cannot be added now, or None."""
        if len(self._flows) >= self.max_flows:
            return FlowRefusal.PORT_LIMIT
        if self._per_source.get(source, 0) >= self.max_per_source:
            return FlowRefusal.SOURCE_LIMIT
        return None

    def add(self, key: K, source: Hashable, flow: F, now: float) -> None:
        """A new flow (`refusal(source)` said None); a key already in the table is a bug."""
        if key in self._flows:
            raise KeyError(f"flow {key!r} exists")
        reason = self.refusal(source)
        if reason is not None:
            raise ValueError(f"flow {key!r} is over a limit: {reason}")
        self._flows[key] = _Entry(flow, source, now)
        self._per_source[source] = self._per_source.get(source, 0) + 1

    def touch(self, key: K, now: float) -> None:
        """A datagram passed on the flow (either way): its idle time starts again."""
        entry = self._flows.get(key)
        if entry is not None:
            entry.last = max(entry.last, now)
            self._flows.move_to_end(key)

    def pop(self, key: K) -> F | None:
        entry = self._flows.pop(key, None)
        if entry is None:
            return None
        left = self._per_source[entry.source] - 1
        if left:
            self._per_source[entry.source] = left
        else:
            del self._per_source[entry.source]
        return entry.flow

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
            self.pop(key)
            expired.append(entry.flow)
        return expired
