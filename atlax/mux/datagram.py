"""One UDP flow carried by a datagram stream (docs/protocol.md, "Datagram streams").

A `DatagramFlow` moves whole datagrams and never waits: its owner hands it each datagram from its
UDP socket (`send`), and it hands each datagram from the tunnel to the owner's `deliver`
callback. What the stream's credit does not cover waits in a short queue (`DatagramQueue`);
what does not fit the queue, or arrives while the tunnel's buffer is above its high-water mark,
is dropped and counted. Credit goes back as soon as a datagram was delivered (or dropped by the
owner's socket), so the tunnel never holds a flow's datagrams for long.

The relay's owner is a public UDP port and one client address, the agent's a connected UDP
socket; either may end the flow with `close()` (RESET to the peer), and `on_close` tells the
owner that the flow ended, whoever ended it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import ErrorCode, LocalProtocolError, Origin, RemoteProtocolError
from ..protocol.datagrams import DEFAULT_QUEUE, DatagramDecoder, DatagramQueue
from .stream import StreamObserver

if TYPE_CHECKING:
    from .session import MuxSession


class FlowState(enum.Enum):
    WAITING = "waiting"  # no owner yet: the first datagrams wait (a few), the rest are dropped
    OPEN = "open"
    CLOSED = "closed"


_NO_OBSERVER = StreamObserver()


def _nowhere(datagram: bytes) -> None:
    pass


class DatagramFlow:
    """One UDP flow: datagrams to and from one client, as a stream of the tunnel."""

    __slots__ = (
        "_decoder",
        "_pending",
        "_queue",
        "_session",
        "deliver",
        "observer",
        "on_close",
        "origin",
        "received",
        "service",
        "state",
        "stream_id",
    )

    def __init__(
        self,
        session: MuxSession,
        stream_id: int,
        service: str,
        origin: Origin | None,
        queue: int = DEFAULT_QUEUE,
    ) -> None:
        self._session = session
        self.stream_id = stream_id
        self.service = service
        self.origin = origin
        self.state = FlowState.WAITING
        self.deliver: Callable[[bytes], None] = _nowhere  # to the owner's socket (which may drop)
        self.on_close: Callable[[], None] | None = None
        self.observer = _NO_OBSERVER  # bytes of datagrams each way, and the end
        self.received = 0  # datagrams from the tunnel, delivered or not
        peer = session.conn.peer_settings
        window = peer.initial_window if peer is not None else 0
        self._queue = DatagramQueue(max_record=window, limit=queue)
        self._decoder = DatagramDecoder()
        self._pending: list[bytes] = []  # from the tunnel before `attach` (at most `queue`)

    @property
    def dropped(self) -> int:
        """Datagrams to the tunnel dropped here: queue full, too large, or the tunnel full."""
        return self._queue.dropped

    @property
    def queued(self) -> int:
        return len(self._queue)

    def attach(self, deliver: Callable[[bytes], None], on_close: Callable[[], None]) -> None:
        """The owner is ready: datagrams from the tunnel go to `deliver` from now on."""
        if self.state is FlowState.WAITING:
            self.state = FlowState.OPEN
            self.deliver = deliver
            self.on_close = on_close
            pending, self._pending = self._pending, []
            for datagram in pending:
                deliver(datagram)

    def send(self, datagram: bytes) -> bool:
        """One datagram toward the peer. False if it was dropped (and counted in `dropped`)."""
        if self.state is FlowState.CLOSED:
            return False
        if self._session.scheduler.paused:  # the tunnel is backed up: drop at the edge
            self._queue.dropped += 1
            return False
        if not self._queue.push(datagram):
            return False
        self.observer.sent(len(datagram))
        self._pump()
        return True

    def close(self, code: int = ErrorCode.CANCEL) -> None:
        """End the flow now (idle, or its socket failed): RESET(`code`) to the peer."""
        self._close(code)

    def abort(self) -> None:
        """End the flow now, as `MuxStream.abort` ends a stream (its port closed)."""
        self._close(ErrorCode.CANCEL)

    # -- called by the session ---------------------------------------------------------------

    def _feed(self, data: bytes | bytearray) -> None:
        """Stream bytes from the peer: deliver every datagram they complete, give credit back."""
        for datagram in self._decoder.feed(data):
            self.received += 1
            self.observer.received(len(datagram))
            if self.state is FlowState.OPEN:
                self.deliver(datagram)
            elif self.state is FlowState.WAITING and len(self._pending) < self._queue.limit:
                self._pending.append(datagram)
        if self.state is not FlowState.CLOSED:
            self._session.conn.acknowledge_received_data(self.stream_id, len(data))

    def _feed_eof(self) -> None:
        """The peer will send no more: a record cut short is its error; either way the flow ends
        (UDP has no half-close to keep)."""
        try:
            self._decoder.end()
        except RemoteProtocolError:
            self._close(ErrorCode.PROTOCOL_ERROR)
            return
        if self.state is FlowState.CLOSED:
            return
        try:
            self._session.conn.end_stream(self.stream_id)
        except LocalProtocolError:
            pass  # the tunnel closed under us
        self._finish(reset=None)

    def _on_window(self) -> None:
        self._pump()

    def _close(self, code: int) -> None:
        if self.state is not FlowState.CLOSED:
            self._finish(reset=code)

    # -- internals ---------------------------------------------------------------------------

    def _pump(self) -> None:
        conn = self._session.conn
        records = self._queue.take(conn.send_window(self.stream_id))
        if not records:
            return
        try:
            conn.send_data(self.stream_id, records)
        except LocalProtocolError:  # the tunnel closed under us
            self._close(ErrorCode.CANCEL)
            return
        self._session.flush()

    def _finish(self, reset: int | None) -> None:
        self.state = FlowState.CLOSED
        self._queue.clear()
        self._pending = []
        self._session.release_flow(self, reset)
        on_close, self.on_close = self.on_close, None
        observer, self.observer = self.observer, _NO_OBSERVER
        observer.closed(reset is None)
        if on_close is not None:
            on_close()
