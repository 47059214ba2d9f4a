"""The I/O shell around the protocol core: one tunnel (`MuxSession`), many `MuxStream`s.

The tunnel is an asyncio protocol: every read is fed to the core inside the transport's callback
and whatever the core queued is written before the callback returns. No task sits between the
socket and the core, so a hop costs one callback, not two task switches.

The session keeps no lifecycle of its own: it reads `conn.state` (the table in
`protocol/state.py`) and, once that is CLOSED, ends every stream, stops its timer and closes the
transport, once. Why it ended is `conn.end`, a typed reason. Time comes from outside: the session
takes a clock, and the keepalive deadline is one timer handle on the event loop. Routing the core's
events to streams (and accepting the streams the peer opens) is `EventRouter`, in dispatch.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol, cast

import anyio
import anyio.abc

from ..budget import BufferBudget
from ..logs import describe
from ..net import close_with_reset
from ..protocol import (
    Connection,
    ConnectionEnd,
    ConnectionState,
    EndReason,
    ErrorCode,
    KeepaliveConfig,
    Origin,
    RemoteProtocolError,
    Role,
    Settings,
)
from .datagram import DatagramFlow
from .dispatch import EventRouter
from .scheduler import ReadScheduler
from .stream import MuxStream

log = logging.getLogger("atlax.mux")

# The tunnel transport asks its writers to pause above this many queued bytes.
TUNNEL_HIGH_WATER = 2 * 1024 * 1024

StreamHandler = Callable[[MuxStream], Awaitable[None]]
FlowHandler = Callable[[DatagramFlow], Awaitable[None]]
_CLOSED = ConnectionState.CLOSED
_LOGGED = frozenset({EndReason.PROTOCOL_ERROR, EndReason.KEEPALIVE_TIMEOUT})


class TunnelClosedError(Exception):
    """The tunnel ended (or is ending) and cannot carry the stream or request."""


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class TimerLoop(Protocol):
    """What the session needs of an event loop: `asyncio.AbstractEventLoop` is one."""

    def call_later(self, delay: float, callback: Callable[[], object], /) -> TimerHandle: ...


class MuxSession(EventRouter, asyncio.BufferedProtocol):
    """Runs the protocol over one asyncio transport (normally TLS) until either side ends it.

    Pass the session as the protocol when connecting (`loop.create_connection`,
    `loop.connect_accepted_socket`), then `await run()`: it runs the stream handler for each
    stream the peer opens and returns when the tunnel ends.
    """

    def __init__(
        self,
        role: Role,
        *,
        settings: Settings | None = None,
        keepalive: KeepaliveConfig | None = None,
        handler: StreamHandler | None = None,
        flow_handler: FlowHandler | None = None,
        name: str = "tunnel",
        clock: Callable[[], float] = time.monotonic,
        loop: TimerLoop | None = None,
        budget: BufferBudget[MuxStream] | None = None,
        window_limit: int = 0,
    ) -> None:
        self.name = name
        # The relay's: bytes held for sockets, bounded relay-wide; receive windows grow from
        # settings.initial_window up to window_limit for sockets that keep up (MuxStream).
        self.budget = budget
        self.window_limit = window_limit
        self.clock = clock
        self.conn = Connection(role, settings, keepalive=keepalive, now=clock())
        self.scheduler: ReadScheduler[MuxStream] = ReadScheduler()
        self.transport: asyncio.Transport | None = None
        self.on_pong: Callable[[float], None] | None = None  # tunnel RTT from keepalive PINGs
        self.on_cluster: Callable[[int], None] | None = None  # a relay's new cluster size
        self._handler = handler
        self._flow_handler = flow_handler
        self._streams: dict[int, MuxStream] = {}
        self._flows: dict[int, DatagramFlow] = {}  # UDP flows (datagram streams)
        self._unhandled: list[MuxStream | DatagramFlow] = []  # accepted before run() started
        # Accepted sockets whose streams wait for the tunnel to drain before they are joined.
        self._parked: list[tuple[MuxStream, socket.socket]] = []
        self._loop = loop
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0
        self._ready = asyncio.Event()  # SETTINGS arrived, or the session ended first
        self._joined = asyncio.Event()  # the pool agent's JOIN arrived, or the session ended
        self._closed = asyncio.Event()  # the session ended: streams closed, transport closing
        self._lost = asyncio.Event()  # the transport is gone
        self._tg: anyio.abc.TaskGroup | None = None

    # -- public API --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.conn.ready

    @property
    def can_open_stream(self) -> bool:
        return self.conn.can_open_stream

    @property
    def peer_settings(self) -> Settings | None:
        """The peer's SETTINGS (with its instance id and cluster size, if a relay), once here."""
        return self.conn.peer_settings

    @property
    def active_streams(self) -> int:
        return len(self._streams) + len(self._flows)

    @property
    def streams(self) -> Collection[MuxStream]:
        """The live streams (a view; for inspection)."""
        return self._streams.values()

    @property
    def rtt(self) -> float | None:
        return self.conn.last_rtt

    @property
    def last_received(self) -> float:
        """When anything last arrived, on `clock`."""
        return self.conn.last_received

    @property
    def end(self) -> ConnectionEnd | None:
        """Why the session ended (or started draining); None while it is up."""
        return self.conn.end

    async def wait_ready(self) -> None:
        """Wait for the peer's SETTINGS; raise TunnelClosedError if the session ends first."""
        await self._ready.wait()
        if not self.ready:
            raise TunnelClosedError(str(self.end or "tunnel closed before it was ready"))

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def wait_joined(self) -> None:
        """Relay: wait for a pool agent's JOIN; raise TunnelClosedError if the session ends
        first (a duplicate the agent closed, or one that never joined)."""
        await self._joined.wait()
        if not self.conn.joined or self.conn.state is _CLOSED:
            raise TunnelClosedError(str(self.end or "tunnel closed before it was joined"))

    def join_cluster(self) -> None:
        """Agent: keep this tunnel as the one to the relay's instance (cluster extension)."""
        self.conn.join()
        self._sync()

    def announce_cluster(self, size: int) -> bool:
        """Relay: tell a pool agent the instances now expected; False if it is not told."""
        sent = self.conn.announce_cluster(size)
        self._sync()
        return sent

    def open_stream_now(
        self, service: str, origin: Origin | None = None, proxy_protocol: int | None = None
    ) -> MuxStream:
        """OPEN a stream (synchronous: usable from a protocol callback)."""
        if not self.conn.can_open_stream:
            raise TunnelClosedError(f"{self.name} cannot open streams now")
        stream_id = self.conn.open_stream(service, origin, proxy_protocol)
        # The origin went out in the OPEN frame: the opening side need not keep it.
        stream = MuxStream(self, stream_id, service, None, proxy_protocol)
        self._streams[stream_id] = stream
        self.flush()
        return stream

    def open_flow_now(self, service: str, origin: Origin | None = None) -> DatagramFlow:
        """OPEN a datagram stream for a UDP flow (the peer must have announced DATAGRAMS)."""
        if not self.conn.can_open_stream:
            raise TunnelClosedError(f"{self.name} cannot open streams now")
        stream_id = self.conn.open_stream(service, origin, datagram=True)
        flow = DatagramFlow(self, stream_id, service, None)
        self._flows[stream_id] = flow
        self.flush()
        return flow

    @property
    def datagrams(self) -> bool:
        """The peer accepts datagram streams (it announced DATAGRAMS)."""
        peer = self.conn.peer_settings
        return peer is not None and peer.datagrams

    async def join(self, stream: MuxStream, sock: socket.socket) -> None:
        """Join `sock` to `stream` now, or, while the tunnel's buffer is over its high-water
        mark, once it drains. A socket joined to a full tunnel would be read at once: uvloop
        starts reading after `connection_made` whatever the protocol asked there, so each
        connection arriving at a full tunnel would add one read (up to 256 KiB) to a buffer
        already over its mark. Parked, its bytes wait in the kernel."""
        if self.scheduler.paused or self._tg is None:
            self._parked.append((stream, sock))  # joined on resume_writing (or run())
            return
        await stream.join(sock)

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """GOAWAY. NO_ERROR lets open streams finish; anything else ends the session now."""
        self.conn.close(error_code, message)
        self._sync()

    async def run(self) -> None:
        """Serve stream handlers until the tunnel ends; all are cancelled at the end.

        Never raises for what the peer or the network did: see `end` for why it ended.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                unhandled, self._unhandled = self._unhandled, []
                for stream in unhandled:
                    tg.start_soon(self._run_handler, stream)
                self._join_parked()
                await self._closed.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self.conn.connection_lost(EndReason.CANCELLED)  # nothing if it ended already
            self._shutdown()
            with anyio.CancelScope(shield=True):
                await self._wait_lost()

    # -- for streams -------------------------------------------------------------------------

    def flush(self) -> None:
        """Write everything the core queued. Never blocks: the transport buffers."""
        transport = self.transport
        if transport is None:
            return  # not connected yet: connection_made flushes
        chunks = self.conn.data_to_send_chunks()
        if not chunks or transport.is_closing():
            return
        if len(chunks) == 1:
            transport.write(chunks[0])
        else:
            transport.writelines(chunks)  # large payloads are not joined (copied) first

    def release(self, stream: MuxStream, reset: int | None) -> None:
        """`stream` is done with the tunnel; `reset`: the code to RESET it with, if still open."""
        if self._streams.get(stream.stream_id) is not stream:
            return  # released before, or the session has ended
        del self._streams[stream.stream_id]
        self.scheduler.forget(stream)
        if reset is not None:
            self.conn.reset_stream(stream.stream_id, reset)
        self._sync()

    def release_flow(self, flow: DatagramFlow, reset: int | None) -> None:
        """`flow` is done with the tunnel; `reset`: the code to RESET it with, if still open."""
        if self._flows.pop(flow.stream_id, None) is not flow:
            return
        if reset is not None:
            self.conn.reset_stream(flow.stream_id, reset)
        self._sync()

    # -- asyncio Protocol: the tunnel's transport --------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        transport.set_write_buffer_limits(high=TUNNEL_HIGH_WATER)
        if self._loop is None:
            self._loop = cast(TimerLoop, asyncio.get_running_loop())
        self.flush()  # our SETTINGS
        self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer()  # TLS decrypts large payloads straight into their frame

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        try:
            events = conn.buffer_updated(nbytes, self.clock())
        except RemoteProtocolError:
            events = []  # the core queued GOAWAY and recorded why
        if events:
            self._dispatch(events)
        self.flush()
        if conn.state is _CLOSED:
            self._shutdown()

    def eof_received(self) -> bool:
        self.conn.connection_lost(EndReason.PEER_CLOSED)
        self._shutdown()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.set()
        if exc is None:
            self.conn.connection_lost(EndReason.PEER_CLOSED)
        else:
            self.conn.connection_lost(EndReason.TRANSPORT_LOST, describe(exc))
        self._shutdown()

    def pause_writing(self) -> None:
        self.scheduler.pause()

    def resume_writing(self) -> None:
        self.scheduler.resume()
        self._join_parked()

    # -- internals ---------------------------------------------------------------------------

    def _join_parked(self) -> None:
        if self._parked and self._tg is not None and not self.scheduler.paused:
            parked, self._parked = self._parked, []
            self._tg.start_soon(self._join_all, parked)

    async def _join_all(self, parked: list[tuple[MuxStream, socket.socket]]) -> None:
        for i, (stream, sock) in enumerate(parked):
            if self.scheduler.paused:  # full again: the rest wait for the next resume
                self._parked[:0] = parked[i:]
                return
            await stream.join(sock)

    def _sync(self) -> None:
        """After a local action: write what it queued; end the session if the core closed."""
        self.flush()
        if self.conn.state is _CLOSED:
            self._shutdown()

    def _shutdown(self) -> None:
        """The connection is over: end every stream, stop the timer, close the transport. Once."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._ready.set()
        self._joined.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()  # a final GOAWAY, if one is queued
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._close(ErrorCode.CANCEL)  # the tunnel is gone: RST to the sockets
        flows = list(self._flows.values())
        self._flows.clear()
        for flow in flows:
            flow._close(ErrorCode.CANCEL)
        parked, self._parked = self._parked, []
        for _, sock in parked:
            close_with_reset(sock)
        end = self.conn.end
        if end is not None and end.reason in _LOGGED:
            log.warning("%s: %s", self.name, end)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _wait_lost(self) -> None:
        transport = self.transport
        if transport is None or self._lost.is_set():
            return
        with anyio.move_on_after(1.0):
            await self._lost.wait()
            return
        transport.abort()

    def _arm_timer(self) -> None:
        """One timer handle at the core's deadline. Traffic only moves the deadline later, so
        the data path never touches the timer: it fires, finds the deadline moved, re-arms."""
        deadline = self.conn.get_timer()
        if deadline is None or self._closed.is_set():
            return
        assert self._loop is not None
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        # A loop timer may fire a little before the deadline by our clock: never early.
        events = self.conn.handle_timer(max(self._timer_at, self.clock()))
        if events:
            self._dispatch(events)
        self._sync()
        self._arm_timer()
