"""Routing the core's events to the session's streams: data, windows, ends and resets to the
stream they name, SETTINGS/PONG/JOIN/cluster news to the session, and each stream the peer
opens to a new `MuxStream` or `DatagramFlow` whose handler the session's task group runs.

`EventRouter` is a part of `MuxSession` (session.py), split out for size: it holds no state of
its own and uses the session's stream tables, events and handlers declared below.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import anyio.abc

from ..protocol import (
    ClusterSizeChanged,
    Connection,
    ConnectionState,
    DataReceived,
    ErrorCode,
    Event,
    PongReceived,
    SettingsReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TunnelJoined,
    WindowUpdated,
)
from .datagram import DatagramFlow, FlowState
from .scheduler import ReadScheduler
from .stream import MuxStream, StreamState

if TYPE_CHECKING:
    from collections.abc import Callable

    from .session import FlowHandler, MuxSession, StreamHandler

log = logging.getLogger("atlax.mux")


class EventRouter:
    """The event side of `MuxSession`: the attributes below are the session's (see there)."""

    name: str
    conn: Connection
    scheduler: ReadScheduler[MuxStream]
    on_pong: Callable[[float], None] | None
    on_cluster: Callable[[int], None] | None
    _handler: StreamHandler | None
    _flow_handler: FlowHandler | None
    _streams: dict[int, MuxStream]
    _flows: dict[int, DatagramFlow]
    _unhandled: list[MuxStream | DatagramFlow]
    _ready: asyncio.Event
    _joined: asyncio.Event
    _tg: anyio.abc.TaskGroup | None

    def _dispatch(self, events: list[Event]) -> None:
        streams, flows = self._streams, self._flows
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id) or flows.get(event.stream_id)
                if stream is not None:
                    stream._feed(event.data)
            elif isinstance(event, WindowUpdated):
                stream = streams.get(event.stream_id) or flows.get(event.stream_id)
                if stream is not None:
                    stream._on_window()
            elif isinstance(event, StreamOpened):
                self._accept(event)
            elif isinstance(event, StreamEnded):
                stream = streams.get(event.stream_id) or flows.get(event.stream_id)
                if stream is not None:
                    stream._feed_eof()
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id) or flows.get(event.stream_id)
                if stream is not None:
                    stream._close(ErrorCode.CANCEL)  # the core has forgotten it: no RESET
            elif isinstance(event, SettingsReceived):
                self.scheduler.set_peer_window(event.settings.initial_window)
                self._ready.set()
            elif isinstance(event, PongReceived):
                if self.on_pong is not None:
                    self.on_pong(event.rtt)
            elif isinstance(event, TunnelJoined):
                self._joined.set()
            elif isinstance(event, ClusterSizeChanged):
                if self.on_cluster is not None:
                    self.on_cluster(event.size)
            # GoAwayReceived, ConnectionTerminated: the core's state says what follows.

    def _accept(self, event: StreamOpened) -> None:
        session = cast("MuxSession", self)  # streams belong to the session this router is part of
        if self.conn.state is not ConnectionState.OPEN:
            self.conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
            return
        stream: MuxStream | DatagramFlow
        if event.datagram:
            if self._flow_handler is None:
                self.conn.reset_stream(event.stream_id, ErrorCode.UNKNOWN_SERVICE)
                return
            stream = DatagramFlow(session, event.stream_id, event.service, event.origin)
            self._flows[event.stream_id] = stream
        else:
            if self._handler is None:
                self.conn.reset_stream(event.stream_id, ErrorCode.REFUSED_STREAM)
                return
            stream = MuxStream(
                session, event.stream_id, event.service, event.origin, event.proxy_protocol
            )
            self._streams[event.stream_id] = stream
        if self._tg is None:
            self._unhandled.append(stream)
        else:
            self._tg.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: MuxStream | DatagramFlow) -> None:
        try:
            if isinstance(stream, DatagramFlow):
                assert self._flow_handler is not None
                await self._flow_handler(stream)
            else:
                assert self._handler is not None
                await self._handler(stream)
        except Exception:
            log.exception("%s: stream %d handler failed", self.name, stream.stream_id)
            stream._close(ErrorCode.INTERNAL_ERROR)
        finally:
            waiting = (
                stream.state is FlowState.WAITING
                if isinstance(stream, DatagramFlow)
                else stream.state is StreamState.CONNECTING
            )
            if waiting:  # neither joined to a socket nor reset
                stream._close(ErrorCode.CANCEL)
