"""The tunnel's state machine: bytes in, typed events out, bytes to send. No I/O, no clock.

Modelled on h2's `H2Connection` and aioquic's `QuicConnection`: the caller feeds received bytes with
`receive_data(data, now)`, acts on the returned events, calls methods such as `send_data`, and
writes whatever `data_to_send()` returns. Time is an argument; keepalive is driven by asking
`get_timer()` when to call `handle_timer(now)`. The lifecycle is the table in `state.py`; why the
connection ended is `end`, set once it is over (or draining).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

from . import events as ev
from . import frames as wire
from .decoder import FrameDecoder
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import HEADER, Flag, Frame, FrameType, Origin, Settings, encode_frame
from .handlers import FrameHandlers
from .ignored import IgnoredFrames
from .keepalive import Keepalive, KeepaliveConfig, TimerAction
from .output import SEPARATE_WRITE, coalesce, split_data
from .state import (
    DRAINING,
    ConnectionEnd,
    ConnectionInput,
    ConnectionState,
    EndReason,
    next_state,
    outlasting,
)
from .streams import Role, StreamTable

# Plain ints and module-level members: enum arithmetic and lookups are slow per frame.
_FIN = int(Flag.FIN)
_DATA = int(FrameType.DATA)
_CLOSED = ConnectionState.CLOSED


class Connection(FrameHandlers):
    def __init__(
        self,
        role: Role,
        settings: Settings | None = None,
        *,
        keepalive: KeepaliveConfig | None = None,
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.local_settings = settings or Settings()
        self.local_settings.validate(LocalProtocolError)
        self.peer_settings: Settings | None = None
        self.state = ConnectionState.AWAITING_SETTINGS
        self.end: ConnectionEnd | None = None  # why it ended (or began draining)
        self._keepalive = Keepalive(keepalive, now)
        self._decoder = FrameDecoder(self.local_settings.max_frame_size)
        self._out: list[bytes | memoryview] = [wire.encode_settings(self.local_settings)]
        self._table = StreamTable(role)
        self._streams = self._table.live  # the same dict, one lookup less per frame
        self._goaway_sent = False
        self._last_received = now
        self._ignored = IgnoredFrames(now)
        # Cluster extension (docs/protocol.md): a relay opens no stream to a pool agent before
        # its JOIN; the cluster size is the one announced last.
        self._awaiting_join = False
        self._joined = False
        self.cluster_size = self.local_settings.cluster_size

    # -- inspection --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The peer's SETTINGS arrived and the connection is not closed."""
        return self.peer_settings is not None and self.state is not _CLOSED

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def last_received(self) -> float:
        return self._last_received

    @property
    def last_rtt(self) -> float | None:
        return self._keepalive.last_rtt

    @property
    def cluster_extension(self) -> bool:
        """Both sides announced the cluster extension: CLUSTER and JOIN exist here."""
        peer = self.peer_settings
        if peer is None:
            return False
        if self.role is Role.CLIENT:
            return self.local_settings.tunnel_pool and peer.instance_id != 0
        return self.local_settings.instance_id != 0 and peer.tunnel_pool

    @property
    def joined(self) -> bool:
        """JOIN was sent (agent) or received (relay) on this connection."""
        return self._joined

    @property
    def awaiting_join(self) -> bool:
        """A relay's connection to a pool agent that has not sent JOIN yet: no streams."""
        return self._awaiting_join

    @property
    def can_open_stream(self) -> bool:
        return (
            self.state is ConnectionState.OPEN
            and not self._awaiting_join
            and self.peer_settings is not None
            and self._table.local_open < self.peer_settings.max_streams
            and self._table.ids_left
        )

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return stream.send.available

    def max_outbound_frame(self) -> int:
        return self.peer_settings.max_frame_size if self.peer_settings else 16_384

    def receive_window(self, stream_id: int) -> int:
        """The stream's receive window now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.recv.size

    def buffered_receive(self, stream_id: int) -> int:
        """Bytes received on the stream and not yet granted back (at most its window)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.recv.size - stream.recv.available

    # -- output ------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return b"".join(self.data_to_send_chunks())

    def data_to_send_chunks(self) -> list[bytes | memoryview]:
        """What to write, as a list for `writelines` (see `output.coalesce`). Large payloads are
        views of the data given to `send_data`: it must not change until the transport took it."""
        out = self._out
        if not out:
            return out
        self._out = []
        return coalesce(out)

    def _emit(self, frame: bytes | memoryview) -> None:
        self._out.append(frame)

    # -- local actions -----------------------------------------------------------------------

    def open_stream(
        self,
        service: str,
        origin: Origin | None = None,
        proxy_protocol: int | None = None,
        datagram: bool = False,
    ) -> int:
        if not self.can_open_stream:
            raise LocalProtocolError(
                f"cannot open a stream now ({self.state.value})", ErrorCode.REFUSED_STREAM
            )
        assert self.peer_settings is not None
        if datagram and not self.peer_settings.datagrams:
            raise LocalProtocolError("the peer did not announce DATAGRAMS: no datagram streams")
        payload = wire.encode_open_payload(service, origin, proxy_protocol, datagram)
        stream_id = self._table.open_local(
            self.peer_settings.initial_window, self.local_settings.initial_window
        )
        self._emit(encode_frame(FrameType.OPEN, 0, stream_id, payload))
        return stream_id

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue `data` (within the stream's credit), split into frames the peer accepts."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or self.state is _CLOSED:
            raise LocalProtocolError(f"stream {stream_id} is closed for sending")
        length = len(data)
        stream.send.spend(length)
        step = self.max_outbound_frame()
        if 0 < length < SEPARATE_WRITE and length <= step:  # the common small write: one item
            flags = _FIN if end_stream else 0
            self._out.append(HEADER.pack(stream_id, length, _DATA, flags, 0) + data)
        else:
            split_data(self._out, stream_id, data, end_stream, step)
        if end_stream:
            stream.local_closed = True
            if stream.remote_closed:
                self._forget(stream_id)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream. Resetting a stream that is already gone does nothing."""
        if self.state is _CLOSED or stream_id not in self._streams:
            return
        self._emit(encode_frame(FrameType.RESET, 0, stream_id, wire.encode_u32(error_code)))
        self._forget(stream_id)

    def acknowledge_received_data(self, stream_id: int, length: int, grow: int = 0) -> None:
        """The application consumed `length` bytes of the stream; maybe grant more credit.
        `grow` raises the stream's window by that much as well (granted at once)."""
        stream = self._streams.get(stream_id)
        if stream is None or self.state is _CLOSED:
            return
        if grow:
            stream.recv.grow(grow)
        increment = stream.recv.consumed(length)
        if increment and not stream.remote_closed:
            self._emit(
                encode_frame(FrameType.WINDOW_UPDATE, 0, stream_id, wire.encode_u32(increment))
            )

    def ping(self, now: float) -> None:
        """Send a PING now (if none is outstanding) to measure the round trip."""
        if self.state is _CLOSED:
            raise LocalProtocolError("the connection is closed")
        payload = self._keepalive.ping(now)
        if payload is not None:
            self._emit(encode_frame(FrameType.PING, 0, 0, payload))

    def join(self) -> None:
        """Agent: keep this tunnel as the one to the relay's instance (JOIN), once."""
        if self.role is not Role.CLIENT or not self.cluster_extension:
            raise LocalProtocolError("JOIN needs the cluster extension, on the agent's side")
        if self._joined or self.state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"cannot JOIN now ({self.state.value}, joined={self._joined})")
        assert self.peer_settings is not None
        self._joined = True
        payload = wire.encode_u32(self.peer_settings.instance_id)
        self._emit(encode_frame(FrameType.JOIN, 0, 0, payload))

    def announce_cluster(self, size: int) -> bool:
        """Relay: the instances it expects changed; tell a pool agent (CLUSTER). True if sent
        (an agent without the extension, or a connection that is over, is not told)."""
        if not 1 <= size <= wire.MAX_CLUSTER_SIZE:
            raise LocalProtocolError(f"cluster size {size} out of range 1..{wire.MAX_CLUSTER_SIZE}")
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a relay announces its cluster size")
        self.cluster_size = size
        if not self.cluster_extension or self.state is _CLOSED:
            return False
        self._emit(encode_frame(FrameType.CLUSTER, 0, 0, wire.encode_u32(size)))
        return True

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Send GOAWAY. With NO_ERROR existing streams may finish; else the connection is over."""
        self._goaway(error_code, message, ConnectionEnd(EndReason.LOCAL_CLOSE, error_code, message))

    def connection_lost(self, reason: EndReason, detail: str = "") -> None:
        """The transport under the connection is gone (or was let go): the connection is over.

        An orderly end of the transport while draining keeps the drain's reason."""
        if self.state is _CLOSED:
            return
        if not (reason is EndReason.PEER_CLOSED and self.state in DRAINING):
            self.end = outlasting(self.end, ConnectionEnd(reason, ErrorCode.NO_ERROR, detail))
        self._transition(ConnectionInput.ENDED)

    # -- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state is _CLOSED:
            return None
        return self._keepalive.deadline(self._last_received)

    def handle_timer(self, now: float) -> list[ev.Event]:
        if self.state is _CLOSED:
            return []
        action = self._keepalive.on_timer(now, self._last_received)
        if action is TimerAction.PING:
            self.ping(now)
        elif action is TimerAction.TIMEOUT:
            assert self._keepalive.config is not None
            code = ErrorCode.KEEPALIVE_TIMEOUT
            message = f"nothing received from the peer for {self._keepalive.config.timeout:g}s"
            self._goaway(code, message, ConnectionEnd(EndReason.KEEPALIVE_TIMEOUT, code, message))
            return [ev.ConnectionTerminated(code, message)]
        return []

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[ev.Event]:
        """Feed bytes read from the transport. Raises RemoteProtocolError if the peer broke a
        rule; GOAWAY with the error code is then queued and the connection is closed."""
        if self.state is _CLOSED:
            return []
        return self._receive(self._decoder.feed(data), len(data), now)

    def get_buffer(self) -> memoryview:
        """A buffer for the transport to read into (never empty); then call `buffer_updated`.

        The zero-copy twin of `receive_data`, shaped like asyncio's `BufferedProtocol`: a large
        DATA payload is read into a buffer of its own that its `DataReceived` event carries.
        """
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int, now: float) -> list[ev.Event]:
        """`nbytes` were read into the last `get_buffer()`; same contract as `receive_data`."""
        if self.state is _CLOSED:
            return []
        try:
            frames = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
        return self._receive(frames, nbytes, now)

    def _receive(self, frames: Iterable[Frame], nbytes: int, now: float) -> list[ev.Event]:
        if nbytes:
            self._last_received = now
        events: list[ev.Event] = []
        try:
            for frame in frames:
                if self.state is _CLOSED:  # a GOAWAY or the last stream's end: nothing after
                    break
                if self.peer_settings is None:
                    self._handle_settings(frame, events)
                else:
                    _HANDLERS[frame.type](self, frame, now, events)
        except ProtocolError as exc:
            self._fail(exc)
        return events

    def _fail(self, exc: ProtocolError) -> NoReturn:
        """The peer broke a rule: queue GOAWAY with the error, close, and raise."""
        message = str(exc.args[0])
        self._goaway(
            exc.error_code,
            message,
            ConnectionEnd(EndReason.PROTOCOL_ERROR, exc.error_code, message),
        )
        if isinstance(exc, LocalProtocolError):  # an internal check tripped on peer input
            raise RemoteProtocolError(message, exc.error_code) from exc
        raise exc

    def _handle_settings(self, frame: Frame, events: list[ev.Event]) -> None:
        if frame.type is not FrameType.SETTINGS:
            raise RemoteProtocolError(f"first frame must be SETTINGS, got {frame.type.name}")
        self.peer_settings = wire.decode_settings(frame.payload)
        self._awaiting_join = self.role is Role.SERVER and self.cluster_extension
        self._transition(ConnectionInput.SETTINGS_RECEIVED)
        events.append(ev.SettingsReceived(self.peer_settings))

    # -- helpers -----------------------------------------------------------------------------

    def _forget(self, stream_id: int) -> None:
        if self._table.forget(stream_id):
            self._ignored.stream_ended()
            self._maybe_drained()

    def _goaway(self, error_code: int, message: str, end: ConnectionEnd) -> None:
        """Queue GOAWAY (once for NO_ERROR; an error one always) and record why."""
        if self.state is _CLOSED:
            return
        graceful = error_code == ErrorCode.NO_ERROR
        if not (graceful and self._goaway_sent):
            self._goaway_sent = True
            last_id = self._table.last_peer_id
            payload = wire.encode_goaway_payload(last_id, error_code, message[:512])
            self._emit(encode_frame(FrameType.GOAWAY, 0, 0, payload))
        self.end = outlasting(self.end, end)
        if graceful:
            self._transition(ConnectionInput.GOAWAY_SENT)
            self._maybe_drained()
        else:
            self._transition(ConnectionInput.ENDED)

    def _maybe_drained(self) -> None:
        if not self._streams and self.state in DRAINING:
            self._transition(ConnectionInput.DRAINED)

    def _transition(self, event: ConnectionInput) -> None:
        self.state = next_state(self.state, event)


_HANDLERS = {
    FrameType.DATA: Connection._on_data,
    FrameType.OPEN: Connection._on_open,
    FrameType.WINDOW_UPDATE: Connection._on_window_update,
    FrameType.RESET: Connection._on_reset,
    FrameType.PING: Connection._on_ping,
    FrameType.GOAWAY: Connection._on_goaway,
    FrameType.SETTINGS: Connection._on_settings,
    FrameType.CLUSTER: Connection._on_cluster,
    FrameType.JOIN: Connection._on_join,
}

__all__ = ["Connection", "Role"]
