"""The anyio shell around the protocol core: one tunnel, many `MuxStream`s.

One task reads the transport and feeds the core, one task writes whatever the core queued (so
frames from all streams are batched into large writes), and one task drives the keepalive timer.
Streams only ever touch the core through this session, and the reader never waits on an
application: each stream's buffer is bounded by the window it granted, so a stream that nobody
reads stops only itself.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream

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

READ_SIZE = 256 * 1024

# The protocol's clock. anyio.current_time() looks up the running async library on every call,
# which cost 14% of the agent's CPU when called per read; deadlines here are only ever turned
# into relative sleeps, so any monotonic clock will do.
_now = time.monotonic
# Stream senders wait once the bytes queued for the transport exceed this: memory stays bounded.
WRITE_HIGH_WATER = 1024 * 1024

StreamHandler = Callable[["MuxStream"], Awaitable[None]]


class StreamResetError(BrokenResourceError):
    """The stream was reset; `error_code` says why (a protocol `ErrorCode` or a plain number)."""

    def __init__(self, stream_id: int, error_code: int, remote: bool) -> None:
        who = "peer" if remote else "tunnel"
        super().__init__(f"stream {stream_id} reset by {who}: {error_name(error_code)}")
        self.error_code = error_code
        self.remote = remote


class TunnelClosedError(BrokenResourceError):
    """The tunnel under the stream ended."""


class MuxStream(anyio.abc.ByteStream):
    """One multiplexed TCP connection, usable wherever an anyio byte stream is."""

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
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._remote_eof = False
        self._local_eof = False
        self._closed = False
        self._error: BrokenResourceError | None = None
        self._readable = anyio.Event()
        self._writable = anyio.Event()
        self.bytes_received = 0
        self.bytes_sent = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read by the application (bounded by the stream window)."""
        return self._buffered

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._closed:
                raise ClosedResourceError
            if self._error is not None:
                raise self._error
            if self._remote_eof:
                raise EndOfStream
            await self._readable.wait()
            self._readable = anyio.Event()
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        self._session._consumed(self.stream_id, len(chunk))
        return chunk

    async def send(self, item: bytes) -> None:
        view = memoryview(item).cast("B")
        session = self._session
        while view:
            self._check_sendable()
            window = session.conn.send_window(self.stream_id)
            if window == 0:
                await self._writable.wait()
                self._writable = anyio.Event()
                continue
            n = min(window, len(view))
            try:
                session.conn.send_data(self.stream_id, view[:n])
            except LocalProtocolError:  # the tunnel failed between our check and the send
                raise TunnelClosedError(session.error or f"{session.name} closed") from None
            self.bytes_sent += n
            view = view[n:]
            await session._queued()

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

    def reset(self, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions with `error_code` (RESET on the wire)."""
        if self._closed:
            return
        self._closed = True
        self._session._reset(self, error_code)
        self._wake()

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

    # -- called by the session ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.bytes_received += len(data)
        self._readable.set()

    def _feed_eof(self) -> None:
        self._remote_eof = True
        self._readable.set()

    def _fail(self, error: BrokenResourceError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        self._readable.set()
        self._writable.set()


class MuxSession:
    """Runs the protocol over one anyio byte stream (normally TLS) until either side ends it."""

    def __init__(
        self,
        transport: anyio.abc.ByteStream,
        role: Role,
        *,
        settings: Settings | None = None,
        keepalive: KeepaliveConfig | None = None,
        handler: StreamHandler | None = None,
        name: str = "tunnel",
    ) -> None:
        self.transport = transport
        self.name = name
        self.conn = Connection(role, settings, keepalive=keepalive, now=_now())
        self._handler = handler
        self._streams: dict[int, MuxStream] = {}
        self._write_needed = anyio.Event()
        self._write_needed.set()  # our SETTINGS are queued already: send them at once
        self._drained = anyio.Event()
        self._ready = anyio.Event()
        self._done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._writing = False  # a task is inside _send_pending
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

    async def open_stream(
        self, service: str, origin: Origin | None = None, proxy_protocol: int | None = None
    ) -> MuxStream:
        if not self.can_open_stream:
            raise TunnelClosedError(f"{self.name} cannot open streams now")
        stream_id = self.conn.open_stream(service, origin, proxy_protocol)
        stream = MuxStream(self, stream_id, service, origin, proxy_protocol)
        self._streams[stream_id] = stream
        self.streams_total += 1
        self._write_needed.set()
        return stream

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """GOAWAY. NO_ERROR lets open streams finish; anything else ends the session now."""
        self._closing = True
        self.conn.close(error_code, message)
        self._write_needed.set()
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
                tg.start_soon(self._writer)
                tg.start_soon(self._timer)
                tg.start_soon(self._reader)
                await self._done.wait()
                tg.cancel_scope.cancel()
        finally:
            self._done.set()
            failure = TunnelClosedError(self.error or f"{self.name} closed")
            for stream in list(self._streams.values()):
                stream._fail(failure)
            self._streams.clear()
            self._drained.set()
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    await self._flush_final()
                await self.transport.aclose()

    # -- tasks -------------------------------------------------------------------------------

    async def _reader(self) -> None:
        conn = self.conn
        receive = self.transport.receive
        while True:
            try:
                data = await receive(READ_SIZE)
            except EndOfStream:
                return self._stop(None if self._closing else "the peer closed the connection")
            except (BrokenResourceError, ClosedResourceError, OSError) as exc:
                return self._stop(f"connection lost: {exc or type(exc).__name__}")
            self.bytes_in += len(data)
            try:
                events = conn.receive_data(data, _now())
            except RemoteProtocolError as exc:
                log.warning("%s: protocol error from peer: %s", self.name, exc)
                self._write_needed.set()
                return self._stop(f"protocol error: {exc}")
            self._dispatch(events)
            if conn.bytes_pending:
                self._write_needed.set()

    async def _writer(self) -> None:
        """Sends what the reader and the timer queue (acks, pongs, window updates); stream data
        is usually sent by the stream's own task, see `_queued`."""
        while not self._done.is_set():
            await self._write_needed.wait()
            self._write_needed = anyio.Event()
            if not self._writing:
                await self._send_pending()

    async def _send_pending(self) -> None:
        """Write everything queued. Only one task at a time is in here (`_writing`)."""
        conn = self.conn
        self._writing = True
        try:
            while conn.bytes_pending:
                data = conn.data_to_send()
                try:
                    # A started write must finish even if the task sending it is cancelled
                    # (a stream's pipe is torn down): half a TLS record would corrupt the
                    # tunnel for every stream. It ends when the transport does, at the latest.
                    with anyio.CancelScope(shield=True):
                        await self.transport.send(data)
                except (BrokenResourceError, ClosedResourceError, EndOfStream, OSError) as exc:
                    self._stop(f"connection lost while sending: {exc or type(exc).__name__}")
                    return
                self.bytes_out += len(data)
                if conn.bytes_pending <= WRITE_HIGH_WATER:
                    self._drained.set()
        finally:
            self._writing = False
            self._drained.set()

    async def _timer(self) -> None:
        while True:
            deadline = self.conn.get_timer()
            if deadline is None:
                await anyio.sleep_forever()
                return
            await anyio.sleep(max(0.0, deadline - _now()))
            events = self.conn.handle_timer(_now())
            self._dispatch(events)
            if self.conn.bytes_pending:
                self._write_needed.set()

    async def _flush_final(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._writing:
            try:
                await self.transport.send(data)
            except (BrokenResourceError, ClosedResourceError, EndOfStream, OSError):
                pass  # the peer is gone already; the GOAWAY was a courtesy

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
                    stream._writable.set()
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
        if self._handler is None or self._tg is None or self._closing:
            self.conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream = MuxStream(self, event.stream_id, event.service, event.origin, event.proxy_protocol)
        self._streams[event.stream_id] = stream
        self.streams_total += 1
        self._tg.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: MuxStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(stream)
        except Exception:
            log.exception("%s: stream %d handler failed", self.name, stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)
        finally:
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

    async def _queued(self) -> None:
        """A stream queued data. If nobody is writing, write it now from this task: one task
        switch less per hop than waking the writer. Otherwise leave it to the task that is
        writing, and wait if too much is queued already (bounded memory)."""
        if not self._writing and not self._done.is_set():
            await self._send_pending()
            return
        self._write_needed.set()
        if self.conn.bytes_pending > WRITE_HIGH_WATER and not self._done.is_set():
            if self._drained.is_set():
                self._drained = anyio.Event()
            await self._drained.wait()
        else:
            await anyio.lowlevel.checkpoint()

    def _consumed(self, stream_id: int, length: int) -> None:
        self.conn.acknowledge_received_data(stream_id, length)
        if self.conn.bytes_pending:
            self._write_needed.set()

    def _end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except LocalProtocolError:
            return  # already reset or the connection is closed
        self._write_needed.set()

    def _reset(self, stream: MuxStream, error_code: int) -> None:
        self.conn.reset_stream(stream.stream_id, error_code)
        self._streams.pop(stream.stream_id, None)
        self._write_needed.set()
        self._maybe_finish_drain()

    def _release(self, stream: MuxStream, *, abort: bool) -> None:
        if abort:
            self.conn.reset_stream(stream.stream_id, ErrorCode.CANCEL)
            self._write_needed.set()
        self._streams.pop(stream.stream_id, None)
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if self._closing and not self._streams:
            self._stop(None)

    def _stop(self, error: str | None) -> None:
        if self.error is None and error is not None:
            self.error = error
        self._done.set()
