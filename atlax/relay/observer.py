"""What the relay reports as it happens, to whoever listens (the metrics, a layer above).

The relay never imports its observers: it calls this interface, whose default does nothing,
and `atlax.metrics.RelayMetrics` implements it with Prometheus. Bytes are the exception to
"call on every event": they change on every read of every stream, so the relay adds them to
plain counters the observer handed out, and the observer reads those when it is scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..protocol import ConnectionEnd
    from .admission import HandshakeFailure
    from .policy import Eviction, Refusal
    from .udp import DatagramDrop


class ByteCounter:
    """Payload bytes of one agent's service, both ways. Plain ints, read when scraped: they
    change on every read of every stream, and a prometheus_client Counter takes a lock per `inc`."""

    __slots__ = ("from_agent", "to_agent")

    def __init__(self) -> None:
        self.to_agent = 0
        self.from_agent = 0


class RelayObserver:
    """Told what happens in the relay. Every method is cheap and must not raise or block."""

    def agent_connected(self, agent: str) -> None:
        """`agent` has a live tunnel now (a replacement tunnel is not a new connection)."""

    def agent_disconnected(self, agent: str) -> None:
        """`agent`'s tunnel ended and no newer one replaced it."""

    def tunnel_ended(self, agent: str, end: ConnectionEnd) -> None:
        """An admitted tunnel of `agent` ended (replaced ones too); `end` says why."""

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        """A connection on the agent port was refused before its tunnel was up."""

    def stream_opened(self, agent: str, service: str) -> ByteCounter:
        """A public connection became a stream; returns where its payload bytes are added."""
        return ByteCounter()

    def stream_closed(self, agent: str, service: str) -> None:
        """A stream that `stream_opened` reported has ended."""

    def connection_refused(self, port: int, reason: Refusal) -> None:
        """A public connection on `port` was closed without reaching an agent."""

    def connection_evicted(self, port: int, reason: Eviction) -> None:
        """An open public connection on `port` was closed to make room (see `Eviction`)."""

    def datagram_dropped(self, port: int, reason: DatagramDrop) -> None:
        """A datagram of an admitted UDP flow on `port` was dropped."""

    def connection_waited(self, port: int, served: bool) -> None:
        """A public connection on `port` waited for its agent's tunnel on this instance (up to
        `agent_wait`); `served` if one came in time (else it was refused as well)."""

    def tunnel_rtt(self, agent: str, seconds: float) -> None:
        """A keepalive PING through `agent`'s tunnel came back after `seconds`."""
