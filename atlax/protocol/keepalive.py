"""Keepalive as pure logic (aioquic style): time is an argument, the caller asks when to call back.

The connection tells `Keepalive` when it last received anything; `deadline()` says when the
timer should next fire and `on_timer()` what to do then: nothing, send a PING, or give up.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

# A timer handled this long after it was due was held up by a busy event loop, and bytes from
# the peer may still wait unread in the socket: silence is not yet proof of a dead peer. The
# verdict is then taken once more, this much later, after the loop has read what is waiting.
LATE_TIMER = 0.05
RECHECK_DELAY = 0.1
# More PINGs than this per second from the peer is a flood.
MAX_PINGS_PER_SECOND = 100


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    interval: float  # send PING after this long without receiving anything
    timeout: float  # give up after this long without receiving anything

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.timeout:
            raise ValueError("keepalive needs 0 < interval < timeout")


class TimerAction(enum.Enum):
    NONE = "none"
    PING = "ping"
    TIMEOUT = "timeout"


class Keepalive:
    """When to PING, when the peer counts as dead, the round trip, and PING floods."""

    __slots__ = (
        "_flood_count",
        "_flood_window",
        "_recheck_at",
        "_sent_at",
        "config",
        "last_rtt",
        "payload",
    )

    def __init__(self, config: KeepaliveConfig | None, now: float) -> None:
        self.config = config
        self.payload = b""  # of the PING in flight
        self.last_rtt: float | None = None
        self._sent_at: float | None = None
        self._recheck_at: float | None = None
        self._flood_window = now
        self._flood_count = 0

    def deadline(self, last_received: float) -> float | None:
        """When to call `on_timer` next (None: never)."""
        config = self.config
        if config is None:
            return None
        if self._recheck_at is not None:
            return self._recheck_at
        base = last_received if self._sent_at is None else self._sent_at
        return min(base + config.interval, last_received + config.timeout)

    def on_timer(self, now: float, last_received: float) -> TimerAction:
        config = self.config
        if config is None:
            return TimerAction.NONE
        due = self.deadline(last_received)
        assert due is not None
        if now >= last_received + config.timeout:
            if self._recheck_at is None and now - due > LATE_TIMER:
                self._recheck_at = now + RECHECK_DELAY
                return self._ping_due(now, last_received)
            return TimerAction.TIMEOUT
        self._recheck_at = None
        return self._ping_due(now, last_received)

    def _ping_due(self, now: float, last_received: float) -> TimerAction:
        assert self.config is not None
        base = last_received if self._sent_at is None else self._sent_at
        if now >= base + self.config.interval:
            self._sent_at = None  # an unanswered ping is simply replaced
            return TimerAction.PING
        return TimerAction.NONE

    def ping(self, now: float) -> bytes | None:
        """The payload of a PING to send now, or None while one is still unanswered."""
        if self._sent_at is not None:
            return None
        self.payload = os.urandom(8)
        self._sent_at = now
        return self.payload

    def pong(self, payload: bytes | bytearray, now: float) -> float | None:
        """The round trip, if `payload` answers the PING in flight."""
        if self._sent_at is None or payload != self.payload:
            return None
        self.last_rtt = max(0.0, now - self._sent_at)
        self._sent_at = None
        return self.last_rtt

    def peer_pinged(self, now: float) -> bool:
        """Count a PING from the peer; False once it sends more than the limit per second."""
        if now - self._flood_window >= 1.0:
            self._flood_window = now
            self._flood_count = 0
        self._flood_count += 1
        return self._flood_count <= MAX_PINGS_PER_SECOND
