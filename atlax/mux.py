"""The I/O shell around the protocol core: one tunnel, many `MuxStream`s.

The tunnel is an asyncio protocol (`MuxSession`): every read is fed to the core inside the
transport's callback and whatever the core queued is written before the callback returns. No task
sits between the socket and the core, so a hop costs one callback, not two task switches.

A `MuxStream` has two faces:

* an anyio `ByteStream` (`receive`/`send`/`send_eof`/`aclose`), for code that wants to talk
  through a stream itself;
* an asyncio protocol, for the common case of joining the stream to a TCP socket: pass the
  stream as the protocol of `loop.create_connection` or `loop.connect_accepted_socket` and from
  then on bytes move between the socket and the tunnel inside callbacks, with no task at all.
  This is how the relay and the agent use it; an idle stream costs a few objects, not tasks.

Flow control is the core's: a stream's bytes waiting on the socket are bounded by the credit it
granted, because credit goes back to the peer only for bytes the socket has taken. A socket is
read only while its stream has a read's worth of credit and the tunnel's buffer is below its
high-water mark; when the buffer fills, every stream that was reading pauses at once. A stalled
stream stops only itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio
import anyio.abc
import anyio.lowlevel
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

from .net import abort_transport
from .protocol import (
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    GoAwayReceived,
    KeepaliveConfig,
    LocalProtocolError,
    Origin,
    PongReceived,
    RemoteProtocolError,
    Role,
    Settings,
    SettingsReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    error_name,
)

log = logging.getLogger("atlax.mux")

# The protocol's clock. anyio.current_time() looks up the running async library on every call,
# which cost 14% of the agent's CPU when called per read; deadlines here are only ever turned
# into relative sleeps, so any monotonic clock will do.
_now = time.monotonic
# The tunnel transport asks its writers to pause above this many queued bytes.
TUNNEL_HIGH_WATER = 2 * 1024 * 1024
# A socket read takes up to 256 KiB (uvloop's read buffer): a stream reads only with that much
# credit left (or half the window, if the peer's window is smaller).
READ_CREDIT = 256 * 1024
# A stream that read within this many pauses of the tunnel counts as reading (see pause_writing).
RECENT_PAUSES = 8

StreamHandler = Callable[["MuxStream"], Awaitable[None]]


class StreamObserver:
    """Told what a spliced stream moves and when it ends (the relay counts with it).

    One small object per stream instead of a closure per counter: idle streams stay cheap.
    """

    __slots__ = ()

    def sent(self, n: int) -> None:
        """`n` bytes read from the socket went into the tunnel."""

    def received(self, n: int) -> None:
        """`n` bytes from the tunnel were written to the socket."""

    def closed(self, ok: bool) -> None:
        """The stream ended: cleanly (both sides sent EOF) or not."""


_NO_OBSERVER = StreamObserver()


class StreamResetError(BrokenResourceError):
    """The stream was reset; `error_code` says why (a protocol `ErrorCode` or a plain number)."""

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        who = "peer" if remote else "tunnel"
        super().__init__(f"stream {stream_id} reset by {who}: {error_name(error_code)}")
        self.error_code = error_code
        self.remote = remote


class TunnelClosedError(BrokenResourceError):
    """The tunnel under the stream ended."""


class MuxStream(anyio.abc.ByteStream, asyncio.Protocol):
    """One multiplexed TCP connection: an anyio byte stream, or the protocol of a socket."""

    # Slots: a relay may hold tens of thousands of idle streams.
    __slots__ = (
        "_acked",
        "_backlog",
        "_blocked",
        "_buffered",
        "_chunks",
        "_closed",
        "_eof_pending",
        "_error",
        "_finished",
        "_local_eof",
        "_read_at",
        "_readable",
        "_remote_eof",
        "_session",
        "_transport",
        "_writable",
        "_written",
        "bytes_received",
        "bytes_sent",
        "observer",
        "origin",
        "preamble",
        "proxy_protocol",
        "service",
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
        self.bytes_received = 0  # from the tunnel
        self.bytes_sent = 0  # into the tunnel
        # Spliced mode: set before the socket connects.
        self.preamble = b""  # written to the socket before anything from the tunnel
        self.observer = _NO_OBSERVER
        # Received, not yet read or given to a socket.
        self._chunks: deque[bytes | bytearray] | None = None
        self._buffered = 0
        self._remote_eof = False
        self._local_eof = False
        self._closed = False
        self._error: BrokenResourceError | None = None
        self._readable: anyio.Event | None = None
        self._writable: anyio.Event | None = None
        # Spliced mode state.
        self._transport: asyncio.Transport | None = None
        self._written = 0  # bytes handed to the socket's transport
        self._acked = 0  # of those, credited back to the peer
        self._backlog: memoryview | None = None  # read from the socket, waiting for credit
        self._eof_pending = False  # the socket's EOF waits behind the backlog
        self._blocked = False  # reading paused while the tunnel's buffer is full
        self._read_at = 0  # the session's pause count at this stream's last read
        self._finished = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by the application or the socket (<= the window)."""
        if self._transport is not None:
            return self._written - self._acked
        return self._buffered

    @property
    def spliced(self) -> bool:
        return self._transport is not None

    # -- anyio ByteStream --------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:  # None or empty
            if self._closed:
                raise ClosedResourceError
            if self._error is not None:
                raise self._error
            if self._remote_eof:
                raise EndOfStream
            self._readable = anyio.Event()
            await self._readable.wait()
        chunks = self._chunks
        chunk = chunks.popleft()
        if len(chunk) > max_bytes:
            chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        self._session._consumed(self.stream_id, len(chunk))
        return chunk if type(chunk) is bytes else bytes(chunk)

    async def send(self, item: bytes) -> None:
        if type(item) is not bytes:
            item = bytes(item)  # the tunnel may hold a view of it after send() returns
        view = memoryview(item)
        session = self._session
        while view:
            self._check_sendable()
            window = session.conn.send_window(self.stream_id)
            if window == 0:
                self._writable = anyio.Event()
                await self._writable.wait()
                continue
            n = min(window, len(view))
            try:
                session.conn.send_data(self.stream_id, view[:n])
            except LocalProtocolError:  # the tunnel failed between our check and the send
                raise TunnelClosedError(session.error or f"{session.name} closed") from None
            self.bytes_sent += n
            view = view[n:]
            session._flush()
            await session._wait_writable()

    async def send_eof(self) -> None:
        if self._local_eof or self._error is not None or self._closed:
            return
        self._local_eof = True
        self._session._end_stream(self.stream_id)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        done = self._local_eof and self._remote_eof
        self._session._release(self, abort=not done and self._error is None)
        self._wake()
        await anyio.lowlevel.checkpoint()

    def abort(self) -> None:
        """End a spliced stream now: RESET(CANCEL) to the peer, RST to the socket if any."""
        self._finish(ok=False)

    def reset(self, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions with `error_code` (RESET on the wire)."""
        if self._closed:
            return
        self._closed = True
        self._session._reset(self, error_code)
        self._wake()
        if self._transport is not None:
            self._finish(ok=False)

    @property
    def extra_attributes(self) -> dict[Any, Callable[[], Any]]:
        return {}

    def _check_sendable(self) -> None:
        if self._closed:
            raise ClosedResourceError
        if self._error is not None:
            raise self._error
        if self._local_eof:
            raise ClosedResourceError("send() after send_eof()")

    def _wake(self) -> None:
        if self._readable is not None:
            self._readable.set()
        if self._writable is not None:
            self._writable.set()

    # -- asyncio Protocol: the stream joined to a socket -------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport = self._transport
        if self._closed or self._error is not None:
            self._finish(ok=False)
            return
        if self.preamble:
            transport.write(self.preamble)
        self._session._readers.add(self)  # a new socket may read at any moment
        chunks, self._chunks, self._buffered = self._chunks or (), None, 0
        for chunk in chunks:  # what arrived while the socket was connecting
            self._feed(chunk)
        if self._remote_eof:
            self._feed_eof()
        self._session._flush()

    def data_received(self, data: bytes) -> None:
        if self._finished:
            return
        self.observer.sent(len(data))
        session = self._session
        session._readers.add(self)
        self._read_at = session._pauses
        if self._backlog is not None:  # cannot happen after pause_reading; be safe anyway
            data = bytes(self._backlog) + data
            self._backlog = None
        self._send_from_socket(data)
        session._flush()  # if that fills the tunnel, pause_writing stops every recent reader
        self._update_reading()

    def eof_received(self) -> bool:
        if self._backlog is not None:
            self._eof_pending = True
        else:
            self._send_fin()
        return True  # keep the socket open: the tunnel may still have bytes for it

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(ok=self._local_eof and self._remote_eof and not self._closed)

    def pause_writing(self) -> None:
        pass  # credit is returned only for bytes the socket took: see _credit_drained

    def resume_writing(self) -> None:
        self._credit_drained()
        self._session._flush()

    def _send_from_socket(self, data: bytes | memoryview) -> None:
        conn = self._session.conn
        size = len(data)
        n = min(conn.send_window(self.stream_id), size)
        if n:
            try:
                conn.send_data(self.stream_id, data if n == size else memoryview(data)[:n])
            except LocalProtocolError:  # reset or the tunnel closed under us
                self._finish(ok=False)
                return
            self.bytes_sent += n
        self._backlog = memoryview(data)[n:] if n < size else None

    def _send_fin(self) -> None:
        self._local_eof = True
        self._session._end_stream(self.stream_id)
        self._maybe_done()

    def _credit_drained(self) -> None:
        """Return credit for what left the socket's buffer (bounded memory per stream)."""
        transport = self._transport
        if transport is None or self._finished:
            return
        drained = self._written - transport.get_write_buffer_size()
        if drained > self._acked:
            self._session.conn.acknowledge_received_data(self.stream_id, drained - self._acked)
            self._acked = drained

    def _maybe_done(self) -> None:
        if self._local_eof and self._remote_eof and self._transport is not None:
            self._transport.close()  # after what is buffered; connection_lost finishes
            self._session._release(self, abort=False)

    def _finish(self, *, ok: bool) -> None:
        """The spliced stream is over: release it (RESET unless both sides ended) and close."""
        if self._finished:
            return
        self._finished = True
        self._backlog = None
        self._session._forget_reader(self)
        if not ok:
            if not self._closed:
                self._closed = True
                self._session._release(self, abort=self._error is None)
            if self._transport is not None:
                abort_transport(self._transport)
        observer, self.observer = self.observer, _NO_OBSERVER  # no cycle left behind
        observer.closed(ok)

    # -- called by the session ---------------------------------------------------------------

    def _feed(self, data: bytes | bytearray) -> None:
        n = len(data)
        self.bytes_received += n
        transport = self._transport
        if transport is None:
            if self._chunks is None:
                self._chunks = deque()
            self._chunks.append(data)
            self._buffered += n
            if self._readable is not None:
                self._readable.set()
            return
        if self._finished:
            self._session.conn.acknowledge_received_data(self.stream_id, n)
            return
        self.observer.received(n)
        transport.write(data)
        self._written += n
        self._credit_drained()

    def _feed_eof(self) -> None:
        self._remote_eof = True
        transport = self._transport
        if transport is None:
            if self._readable is not None:
                self._readable.set()
            return
        if self._finished:
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._maybe_done()

    def _on_window(self) -> None:
        if self._writable is not None:
            self._writable.set()
        if self._finished:
            return
        backlog = self._backlog
        if backlog is not None:
            self._send_from_socket(backlog)
            if self._backlog is None and self._eof_pending:
                self._send_fin()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read from the socket only when the tunnel can take a whole read at once: its buffer
        is below the high-water mark, nothing waits for credit, and the credit left covers
        a read. So a read never waits in memory, and a full tunnel stops every reader."""
        transport = self._transport
        if transport is None or self._finished:
            return
        session = self._session
        if session._write_paused and not self._blocked:
            self._blocked = True  # until resume_writing
            session._blocked.append(self)
        pause = (
            self._blocked
            or self._backlog is not None
            or session.conn.send_window(self.stream_id) < session._read_credit
        )
        if pause == transport.is_reading():  # uvloop starts reading after connection_made
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _unblock(self) -> None:
        self._blocked = False
        self._update_reading()

    def _fail(self, error: BrokenResourceError) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        if self._transport is not None and not self._finished:
            self._closed = True  # the tunnel side is gone already: nothing to release
            self._finish(ok=False)


class MuxSession(asyncio.BufferedProtocol):
    """Runs the protocol over one asyncio transport (normally TLS) until either side ends it.

    Pass the session as the protocol when connecting (`loop.create_connection`,
    `loop.connect_accepted_socket`), then `await run()`: it serves the tunnel, runs the stream
    handler for each stream the peer opens, drives the keepalive timer, and returns when the
    tunnel ends.
    """

    def __init__(
        self,
        role: Role,
        *,
        settings: Settings | None = None,
        keepalive: KeepaliveConfig | None = None,
        handler: StreamHandler | None = None,
        name: str = "tunnel",
    ) -> None:
        self.name = name
        self.conn = Connection(role, settings, keepalive=keepalive, now=_now())
        self.transport: asyncio.Transport | None = None
        self._handler = handler
        self._streams: dict[int, MuxStream] = {}
        self._pending: list[MuxStream] = []  # accepted before run() started
        self._ready = anyio.Event()
        self._done = anyio.Event()
        self._stopped = False  # = _done.is_set(), without two calls on every read
        self._lost = anyio.Event()
        self._drained: anyio.Event | None = None
        self._write_paused = False
        self._blocked: list[MuxStream] = []  # streams that paused their socket for us
        # Who may read while the tunnel is paused, so that pause_writing stops them all at once
        # without visiting every idle stream: streams that connected or read since the last
        # pause, and those resumed at the last resume that read in the last few pauses.
        self._readers: set[MuxStream] = set()
        self._resumed: set[MuxStream] = set()
        self._pauses = 0
        self._read_credit = READ_CREDIT  # a stream reads only with this much credit left
        self._tg: anyio.abc.TaskGroup | None = None
        self._closing = False
        self.goaway: GoAwayReceived | None = None
        self.error: str | None = None  # why the session ended, if not cleanly
        self.bytes_in = 0
        self.bytes_out = 0
        self.streams_total = 0
        self.on_pong: Callable[[float], None] | None = None  # tunnel RTT from keepalive PINGs

    # -- public API --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._done.is_set()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open_stream(self) -> bool:
        return self.ready and not self._closing and self.conn.can_open_stream

    @property
    def rtt(self) -> float | None:
        return self.conn.last_rtt

    @property
    def last_received(self) -> float:
        return self.conn.last_received

    async def wait_ready(self) -> None:
        """Wait for the peer's SETTINGS; raise TunnelClosedError if the session ends first."""
        async with anyio.create_task_group() as tg:

            async def watch_done() -> None:
                await self._done.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_done)
            await self._ready.wait()
            tg.cancel_scope.cancel()
        if not self.ready:
            raise TunnelClosedError(self.error or "tunnel closed before it was ready")

    async def wait_closed(self) -> None:
        await self._done.wait()

    def open_stream_now(
        self, service: str, origin: Origin | None = None, proxy_protocol: int | None = None
    ) -> MuxStream:
        """OPEN a stream (synchronous: usable from a protocol callback)."""
        if not self.can_open_stream:
            raise TunnelClosedError(f"{self.name} cannot open streams now")
        stream_id = self.conn.open_stream(service, origin, proxy_protocol)
        # The origin went out in the OPEN frame: the opening side need not keep it.
        stream = MuxStream(self, stream_id, service, None, proxy_protocol)
        self._streams[stream_id] = stream
        self.streams_total += 1
        self._flush()
        return stream

    async def open_stream(
        self, service: str, origin: Origin | None = None, proxy_protocol: int | None = None
    ) -> MuxStream:
        stream = self.open_stream_now(service, origin, proxy_protocol)
        await anyio.lowlevel.checkpoint()
        return stream

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """GOAWAY. NO_ERROR lets open streams finish; anything else ends the session now."""
        self._closing = True
        self.conn.close(error_code, message)
        self._flush()
        if error_code != ErrorCode.NO_ERROR:
            self._stop(f"closed locally: {error_name(error_code)} {message}".strip())
        elif not self._streams:
            self._stop(None)

    async def run(self) -> None:
        """Serve the tunnel until it ends. Stream handlers run inside; all are cancelled at the end.

        Never raises for what the peer or the network did: see `error` for why it ended.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                pending, self._pending = self._pending, []
                for stream in pending:
                    tg.start_soon(self._run_handler, stream)
                tg.start_soon(self._timer)
                await self._done.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._stopped = True
            self._done.set()
            failure = TunnelClosedError(self.error or f"{self.name} closed")
            for stream in list(self._streams.values()):
                stream._fail(failure)
            self._streams.clear()
            self._unblock_all()
            with anyio.CancelScope(shield=True):
                await self._close_transport()

    async def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or self._lost.is_set():
            return
        self._flush()  # a final GOAWAY, if one is queued
        transport.close()
        with anyio.move_on_after(1.0):
            await self._lost.wait()
            return
        transport.abort()

    # -- asyncio Protocol: the tunnel's transport --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)
        self._flush()  # our SETTINGS

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()  # TLS decrypts large payloads straight into their frame

    def buffer_updated(self, nbytes: int) -> None:
        if self._stopped:
            return
        self.bytes_in += nbytes
        try:
            events = self.conn.buffer_updated(nbytes, _now())
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error from peer: %s", self.name, exc)
            self._flush()
            self._stop(f"protocol error: {exc}")
            return
        self._dispatch(events)
        self._flush()

    def eof_received(self) -> bool:
        self._stop(None if self._closing else "the peer closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        if exc is not None:
            self._stop(f"connection lost: {exc or type(exc).__name__}")
        else:
            self._stop(None if self._closing else "the peer closed the connection")

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pauses += 1
        readers, resumed = self._readers, self._resumed
        self._readers, self._resumed = set(), set()
        for stream in readers | resumed:  # at once: each would add one more read to the buffer
            stream._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None:
            self._drained.set()
        self._unblock_all()

    # -- output ------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write everything the core queued. Never blocks: the transport buffers."""
        conn = self.conn
        if not conn.bytes_pending:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # not connected yet (connection_made flushes) or gone (nothing to do)
        self.bytes_out += conn.bytes_pending
        chunks = conn.data_to_send_chunks()
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)  # large payloads are not joined (copied) first

    async def _wait_writable(self) -> None:
        """For anyio-side senders: wait while the tunnel's buffer is above its high-water mark."""
        if self._write_paused and not self._done.is_set():
            self._drained = anyio.Event()
            await self._drained.wait()
        else:
            await anyio.lowlevel.checkpoint()

    def _unblock_all(self) -> None:
        blocked, self._blocked = self._blocked, []
        for stream in blocked:
            stream._unblock()
        # Streams that read lately go on reading: the next pause must stop them too, even if
        # they get no read in before it. One that stopped reading drops out after a few pauses,
        # so idle streams are not visited on every pause.
        pauses = self._pauses
        self._resumed = {s for s in blocked if pauses - s._read_at <= RECENT_PAUSES}

    def _forget_reader(self, stream: MuxStream) -> None:
        self._readers.discard(stream)
        self._resumed.discard(stream)

    async def _timer(self) -> None:
        while True:
            deadline = self.conn.get_timer()
            if deadline is None:
                await anyio.sleep_forever()
                return
            await anyio.sleep(max(0.0, deadline - _now()))
            events = self.conn.handle_timer(_now())
            self._dispatch(events)
            self._flush()

    # -- events ------------------------------------------------------------------------------

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._feed(event.data)
                else:  # the application closed it meanwhile: keep the credit flowing
                    self.conn.acknowledge_received_data(event.stream_id, len(event.data))
            elif isinstance(event, WindowUpdated):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_window()
            elif isinstance(event, StreamOpened):
                self._accept(event)
            elif isinstance(event, StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._feed_eof()
            elif isinstance(event, StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._fail(StreamResetError(event.stream_id, event.error_code, event.remote))
                self._maybe_finish_drain()
            elif isinstance(event, SettingsReceived):
                self._read_credit = min(READ_CREDIT, event.settings.initial_window // 2)
                self._ready.set()
            elif isinstance(event, PongReceived):
                if self.on_pong is not None:
                    self.on_pong(event.rtt)
            elif isinstance(event, GoAwayReceived):
                self._on_goaway(event)
            elif isinstance(event, ConnectionTerminated):
                log.warning("%s: %s", self.name, event.message)
                self._stop(event.message)

    def _accept(self, event: StreamOpened) -> None:
        if self._handler is None or self._closing or self._done.is_set():
            self.conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream = MuxStream(self, event.stream_id, event.service, event.origin, event.proxy_protocol)
        self._streams[event.stream_id] = stream
        self.streams_total += 1
        if self._tg is None:
            self._pending.append(stream)
        else:
            self._tg.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: MuxStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        except Exception:
            log.exception("%s: stream %d handler failed", self.name, stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)
        finally:
            if not stream.spliced:  # a spliced stream lives on in its socket's callbacks
                await stream.aclose()

    def _on_goaway(self, event: GoAwayReceived) -> None:
        self.goaway = event
        self._closing = True
        if event.error_code != ErrorCode.NO_ERROR:
            detail = f"{error_name(event.error_code)}: {event.message}".rstrip(": ")
            self._stop(f"peer sent GOAWAY {detail}")
        elif not self._streams:
            self._stop(None)

    # -- called by streams -------------------------------------------------------------------

    def _consumed(self, stream_id: int, length: int) -> None:
        self.conn.acknowledge_received_data(stream_id, length)
        self._flush()

    def _end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except LocalProtocolError:
            return  # already reset or the connection is closed
        self._flush()

    def _reset(self, stream: MuxStream, error_code: int) -> None:
        self.conn.reset_stream(stream.stream_id, error_code)
        self._streams.pop(stream.stream_id, None)
        self._flush()
        self._maybe_finish_drain()

    def _release(self, stream: MuxStream, *, abort: bool) -> None:
        if self._streams.get(stream.stream_id) is not stream:
            return  # released before, or the session has ended
        if abort:
            self.conn.reset_stream(stream.stream_id, ErrorCode.CANCEL)
            self._flush()
        del self._streams[stream.stream_id]
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self._closing and not self._streams:
            self._stop(None)

    def _stop(self, error: str | None) -> None:
        if self.error is None and error is not None:
            self.error = error
        self._stopped = True
        self._done.set()
