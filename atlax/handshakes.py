"""Caps on unauthenticated connections at the agent port (pure bookkeeping, no sockets).

Every connection on the agent port costs a TLS session before anyone knows who is calling. The
gate admits at most `total` of them at once and `per_source` from one source (an IPv4 address,
an IPv6 /64: one host usually holds a whole /64). Over the per-source cap the newcomer is
refused: that source is the abuser. Over the total the *oldest* pending handshake is evicted to
admit the newcomer: a flood from many addresses must then outpace a real agent's handshake
(a cap of 128 against a 100 ms handshake takes ~1,300 connections a second), where refusing
newcomers would let a dozen connections a second hold the port shut.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

Source = ipaddress.IPv4Address | ipaddress.IPv6Network | None


def source_of(address: Any) -> Source:
    """The unit the per-source cap counts: an IPv4 address, or the /64 of an IPv6 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ipaddress.IPv6Network((ip, 64), strict=False)
    return ip


class Verdict(enum.Enum):
    ADMITTED = "admitted"
    REFUSED = "source_handshake_limit"  # the value is the metric label


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    evicted: Hashable | None = None  # a pending handshake to end to make room


class HandshakeGate:
    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        self._pending: OrderedDict[Hashable, Source] = OrderedDict()  # oldest first
        self._per_source: dict[Source, int] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def admit(self, token: Hashable, source: Source) -> Admission:
        """Admit the handshake `token` from `source`, maybe naming one to evict for it."""
        if source is not None and self._per_source.get(source, 0) >= self.per_source:
            return Admission(Verdict.REFUSED)
        evicted = None
        if len(self._pending) >= self.total:
            evicted = next(iter(self._pending))
            self.done(evicted)
        self._pending[token] = source
        self._per_source[source] = self._per_source.get(source, 0) + 1
        return Admission(Verdict.ADMITTED, evicted)

    def done(self, token: Hashable) -> None:
        """The handshake ended (authenticated, failed, timed out or evicted). Idempotent."""
        if token not in self._pending:
            return
        source = self._pending.pop(token)
        left = self._per_source[source] - 1
        if left:
            self._per_source[source] = left
        else:
            del self._per_source[source]
