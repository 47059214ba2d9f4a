"""One multiplexed TCP connection: a `MuxStream` is the asyncio protocol of a socket.

Pass the stream as the protocol of `loop.create_connection` or `loop.connect_accepted_socket`:
from then on bytes move between the socket and the tunnel inside callbacks, with no task at all,
and an idle stream costs a few objects. What arrives before the socket is connected waits.

Flow control is the core's: credit goes back to the peer only for bytes the socket's transport
has handed to the kernel, so a stream's bytes in memory are bounded by the window it granted.
The socket is read only while `ReadScheduler.wants()` says so.

A stream has one state field, and it ends in one of two ways: cleanly, once both sides sent EOF
and the socket wrote what it held (`CLOSING` -> `CLOSED`), or at once by `_close(code)`: RESET to
the peer (if the tunnel still has the stream), RST to the socket.
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import logging
import socket
import struct
import sys
import termios
from typing import TYPE_CHECKING, cast

from ..net import abort_transport, close_with_reset
from ..protocol import ErrorCode, LocalProtocolError, Origin

if TYPE_CHECKING:
    from .session import MuxSession

log = logging.getLogger("atlax.mux")

_INT = struct.Struct("i")
_SIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


class StreamState(enum.Enum):
    CONNECTING = "connecting"  # no socket yet: what arrives waits
    OPEN = "open"
    REMOTE_EOF = "remote eof"  # the peer's FIN was passed to the socket
    LOCAL_EOF = "local eof"  # the socket's EOF goes to the peer as FIN (after any backlog)
    CLOSING = "closing"  # both: released from the tunnel, the socket writes what it holds
    CLOSED = "closed"


# Module-level members: a global lookup per check on the data path, not a class attribute.
_CONNECTING = StreamState.CONNECTING
_OPEN = StreamState.OPEN
_REMOTE_EOF = StreamState.REMOTE_EOF
_LOCAL_EOF = StreamState.LOCAL_EOF
_CLOSING = StreamState.CLOSING
_CLOSED = StreamState.CLOSED


class StreamObserver:
    """Told what a stream moves and when it ends (the relay counts with it).

    One small object per stream instead of a closure per counter: idle streams stay cheap.
    """

    __slots__ = ()

    def sent(self, n: int) -> None:
        """`n` bytes read from the socket went into the tunnel."""

    def received(self, n: int) -> None:
        """`n` bytes from the tunnel were written to the socket."""

    def closed(self, ok: bool) -> None:
        """The stream ended: cleanly (both sides sent EOF) or not."""

    def evicted(self) -> None:
        """The stream is being closed to give the relay's buffer budget back."""


_NO_OBSERVER = StreamObserver()


class MuxStream(asyncio.Protocol):
    """One multiplexed TCP connection, as the protocol of its socket."""

    # Slots: a relay may hold tens of thousands of idle streams.
    __slots__ = (
        "_acked",
        "_backlog",
        "_drain_tick",
        "_grow_at",
        "_pending",
        "_session",
        "_transport",
        "_written",
        "observer",
        "origin",
        "preamble",
        "proxy_protocol",
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
        proxy_protocol: int | None = None,
    ):
        self._session = session
        self.stream_id = stream_id
        self.service = service
        self.origin = origin
        self.proxy_protocol = proxy_protocol
        self.state = _CONNECTING
        self.preamble = b""  # written to the socket before anything from the tunnel
        self.observer = _NO_OBSERVER
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes | bytearray] | None = None  # before the socket; b"" = FIN
        self._written = 0  # bytes handed to the socket's transport
        self._acked = 0  # of those, credited back to the peer
        self._backlog: memoryview | None = None  # read from the socket, waiting for credit
        self._grow_at = 0  # bytes drained at which the window may grow next (0: not yet known)
        self._drain_tick = -1  # holding bytes in the budget: the clock's tick of the last drain

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by the socket (at most the window)."""
        if self._transport is not None:
            return self._written - self._acked
        return sum(len(chunk) for chunk in self._pending or ())

    async def join(self, sock: socket.socket) -> None:
        """Make the stream the protocol of an accepted socket: from then on bytes move between
        them in callbacks. A socket that is gone, or a stream that ended meanwhile, is reset."""
        if self.state is _CLOSED:
            close_with_reset(sock)
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: self, sock)
        except (OSError, ValueError) as exc:
            log.debug("%s: socket gone before it was joined: %s", self._session.name, exc)
            self.abort()
            close_with_reset(sock)

    def abort(self) -> None:
        """End the stream now: RESET(CANCEL) to the peer, RST to the socket if any."""
        self._close(ErrorCode.CANCEL)

    def reset(self, error_code: int = ErrorCode.CANCEL) -> None:
        """End the stream now with `error_code` (RESET on the wire), RST to the socket if any."""
        self._close(error_code)

    def evict(self) -> None:
        """Closed to give the relay's buffer budget back (the observer is told first)."""
        self.observer.evicted()
        self._close(ErrorCode.CANCEL)

    # -- asyncio Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        if self.state is _CLOSED:
            abort_transport(transport)
            return
        # Told each time the socket's buffer empties, so credit goes back for every byte the
        # socket took, whatever the window (see `resume_writing`).
        transport.set_write_buffer_limits(high=0)
        if self.preamble:
            transport.write(self.preamble)
        self.state = _OPEN
        pending, self._pending = self._pending, None
        for chunk in pending or ():
            if chunk:
                self._feed(chunk)
            else:
                self._feed_eof()
        self.update_reading()
        self._session.flush()

    def data_received(self, data: bytes) -> None:
        if self.state is _CLOSED:
            return
        self.observer.sent(len(data))
        if self._backlog is not None:  # plain asyncio may deliver a read after pause_reading
            data = bytes(self._backlog) + data
            self._backlog = None
        self._send(data)
        self._session.flush()  # if that fills the tunnel, the scheduler stops every reader
        self.update_reading(read=True)

    def eof_received(self) -> bool:
        state = self.state
        if state is _OPEN:
            self.state = _LOCAL_EOF
        elif state is _REMOTE_EOF:
            self.state = _CLOSING
        else:
            return True
        if self._backlog is None:
            self._send_fin()
        self._maybe_done()
        return True  # keep the socket open: the tunnel may still have bytes for it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is _CLOSING and self._backlog is None:  # released, the socket flushed
            self.state = _CLOSED
            self._end(ok=True)
        else:
            self._close(ErrorCode.CANCEL)

    def pause_writing(self) -> None:
        pass  # the socket's buffer is not empty: credit waits for resume_writing

    def resume_writing(self) -> None:
        if self.state is not _CLOSED:
            self._credit()
            self._session.flush()

    # -- for the scheduler -------------------------------------------------------------------

    def update_reading(self, read: bool = False) -> None:
        """Read from the socket only when the scheduler says so (`read`: it just read)."""
        transport = self._transport
        state = self.state
        if transport is None or (state is not _OPEN and state is not _REMOTE_EOF):
            return  # no socket, or it sent EOF: nothing more to read
        session = self._session
        want = session.scheduler.wants(
            self, session.conn.send_window(self.stream_id), self._backlog is not None, read
        )
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def has_input(self) -> bool:
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        try:
            return bool(_INT.unpack(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))[0])
        except (OSError, ValueError):
            return False

    # -- called by the session ---------------------------------------------------------------

    def _feed(self, data: bytes | bytearray) -> None:
        """Bytes from the peer."""
        transport = self._transport
        if transport is None:
            if self._pending is None:
                self._pending = []
            self._pending.append(data)
            return
        n = len(data)
        self.observer.received(n)
        transport.write(data)
        self._written += n
        budget = self._session.budget
        if budget is None:
            self._credit()
            return
        budget.held += n
        self._credit()
        if self._written > self._acked and self._drain_tick < 0:  # holds bytes from now on
            self._drain_tick = budget.clock.now
            budget.holding(self)
        if budget.held > budget.limit:
            budget.enforce()

    def _feed_eof(self) -> None:
        """The peer's FIN."""
        state = self.state
        if state is _CONNECTING:
            if self._pending is None:
                self._pending = []
            self._pending.append(b"")
            return
        if state is _OPEN:
            self.state = _REMOTE_EOF
        elif state is _LOCAL_EOF:
            self.state = _CLOSING
        else:
            return
        transport = self._transport
        assert transport is not None
        if transport.can_write_eof():
            transport.write_eof()
        self._maybe_done()

    def _on_window(self) -> None:
        """The peer granted credit: send what waits for it, maybe read again."""
        backlog = self._backlog
        if backlog is not None:
            self._send(backlog)
            if self._backlog is None and (self.state is _LOCAL_EOF or self.state is _CLOSING):
                self._send_fin()
                self._maybe_done()
        self.update_reading()

    def _close(self, code: int) -> None:
        """End now: RESET(`code`) to the peer if the tunnel still has the stream, RST to the
        socket, the observer told. Every early end of a stream comes here."""
        if self.state is _CLOSED:
            return
        self.state = _CLOSED
        self._backlog = self._pending = None
        self._session.release(self, code)
        if self._transport is not None:
            abort_transport(self._transport)
        self._end(ok=False)

    # -- internals ---------------------------------------------------------------------------

    def _send(self, data: bytes | memoryview) -> None:
        conn = self._session.conn
        size = len(data)
        n = min(conn.send_window(self.stream_id), size)
        if n:
            try:
                conn.send_data(self.stream_id, data if n == size else memoryview(data)[:n])
            except LocalProtocolError:  # the tunnel closed under us
                self._close(ErrorCode.CANCEL)
                return
        self._backlog = memoryview(data)[n:] if n < size else None

    def _send_fin(self) -> None:
        try:
            self._session.conn.end_stream(self.stream_id)
        except LocalProtocolError:  # the tunnel closed under us
            self._close(ErrorCode.CANCEL)
            return
        self._session.flush()

    def _maybe_done(self) -> None:
        """Both sides sent EOF and nothing waits for credit: the tunnel is done with the stream;
        the socket closes once it has written what it holds (then `connection_lost`)."""
        if self.state is _CLOSING and self._backlog is None:
            self._session.release(self, None)
            assert self._transport is not None
            self._transport.close()

    def _credit(self) -> None:
        """Return credit for what left the socket's buffer (bounded memory per stream).

        With a budget (the relay), the window starts small and doubles, up to the session's
        window limit, each time a whole window went through to a client that keeps up: nothing
        left waiting in the relay, less than half a window in the kernel's send queue (a socket
        that "took everything" may only have queued it for a client that does not read)."""
        transport = self._transport
        assert transport is not None
        drained = self._written - transport.get_write_buffer_size()
        if drained <= self._acked:
            return
        session = self._session
        budget = session.budget
        grow = 0
        if budget is not None:
            budget.held -= drained - self._acked
            left = self._written - drained
            if self._drain_tick >= 0:  # it was holding: reorder at most once per tick
                if not left:
                    self._drain_tick = -1
                    budget.emptied(self)
                elif budget.clock.now != self._drain_tick:
                    self._drain_tick = budget.clock.now
                    budget.drained(self)
            if not left and drained >= self._grow_at:  # a whole window went through
                window = session.conn.receive_window(self.stream_id)
                if (
                    self._grow_at
                    and window < session.window_limit
                    and budget.room_to_grow
                    and self._kernel_queue() < window // 2
                ):
                    grow = min(window, session.window_limit - window)
                self._grow_at = drained + window + grow
        session.conn.acknowledge_received_data(self.stream_id, drained - self._acked, grow)
        self._acked = drained

    def _kernel_queue(self) -> int:
        """Bytes the kernel holds in the socket's send queue (Linux SIOCOUTQ; 0 elsewhere)."""
        transport = self._transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or _SIOCOUTQ is None:
            return 0
        try:
            return int(_INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(4)))[0])
        except (OSError, ValueError):
            return 0

    def _end(self, *, ok: bool) -> None:
        budget = self._session.budget
        if budget is not None and self._written > self._acked:
            budget.release(self, self._written - self._acked)  # dropped with the socket
            self._acked = self._written
            self._drain_tick = -1
        observer, self.observer = self.observer, _NO_OBSERVER  # no cycle left behind
        observer.closed(ok)
