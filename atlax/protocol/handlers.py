"""What each frame received after SETTINGS does to the connection: one handler per frame type.

`Connection` inherits these and dispatches to them through its `_HANDLERS` table; the state they
touch (streams, keepalive, the lifecycle) is the connection's, declared here for the type checker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import events as ev
from . import frames as wire
from .errors import ErrorCode, RemoteProtocolError
from .frames import Flag, Frame, FrameType, Settings, decode_u32, encode_frame
from .ignored import IgnoredFrames
from .keepalive import Keepalive
from .state import ConnectionEnd, ConnectionInput, EndReason, outlasting
from .streams import Role, StreamRecord, StreamTable

_FIN = int(Flag.FIN)


class FrameHandlers:
    role: Role
    local_settings: Settings
    peer_settings: Settings | None
    end: ConnectionEnd | None
    _keepalive: Keepalive
    _table: StreamTable
    _streams: dict[int, StreamRecord]
    _goaway_sent: bool
    _ignored: IgnoredFrames
    _awaiting_join: bool
    _joined: bool

    if TYPE_CHECKING:

        @property
        def cluster_extension(self) -> bool: ...

        def _emit(self, frame: bytes | memoryview) -> None: ...

        def _forget(self, stream_id: int) -> None: ...

        def _maybe_drained(self) -> None: ...

        def _transition(self, event: ConnectionInput) -> None: ...

    def _on_settings(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        raise RemoteProtocolError("SETTINGS may be sent only once")

    def _on_ping(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        if frame.flags & Flag.ACK:
            rtt = self._keepalive.pong(frame.payload, now)
            if rtt is not None:
                events.append(ev.PongReceived(rtt))
            else:
                self._ignored.ignored(now)  # a PING ACK nobody asked for
            return
        if not self._keepalive.peer_pinged(now):
            raise RemoteProtocolError(
                "more than 100 PINGs in one second", ErrorCode.ENHANCE_YOUR_CALM
            )
        self._emit(encode_frame(FrameType.PING, Flag.ACK, 0, frame.payload))

    def _on_goaway(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        last_id, code, message = wire.decode_goaway_payload(frame.payload)
        error_code = ErrorCode.parse(code)
        events.append(ev.GoAwayReceived(last_id, error_code, message))
        # Our streams above the peer's last id were never processed: they are refused.
        for stream_id in self._table.local_above(last_id):
            self._forget(stream_id)
            events.append(ev.StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=True))
        self.end = outlasting(self.end, ConnectionEnd(EndReason.PEER_GOAWAY, error_code, message))
        if error_code != ErrorCode.NO_ERROR:
            self._transition(ConnectionInput.ENDED)
        else:
            self._transition(ConnectionInput.GOAWAY_RECEIVED)
            self._maybe_drained()

    def _on_open(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        stream_id = frame.stream_id
        self._table.check_peer_id(stream_id)
        request = wire.decode_open_payload(frame.payload)
        if request.datagram and not self.local_settings.datagrams:
            raise RemoteProtocolError("OPEN of a datagram stream, but DATAGRAMS was not announced")
        if self._goaway_sent:
            self._ignored.ignored(now)
            return  # after our GOAWAY: ignored (so are its frames), the peer retries elsewhere
        if self._table.peer_open >= self.local_settings.max_streams:
            self._table.refuse()  # raises once the peer floods
            self._ignored.stream_ended()  # its DATA in flight is ignored, and allowed for
            code = wire.encode_u32(ErrorCode.REFUSED_STREAM)
            self._emit(encode_frame(FrameType.RESET, 0, stream_id, code))
            events.append(ev.StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=False))
            return
        assert self.peer_settings is not None
        stream = self._table.open_peer(
            stream_id, self.peer_settings.initial_window, self.local_settings.initial_window
        )
        events.append(
            ev.StreamOpened(
                stream_id, request.service, request.origin, request.proxy_protocol, request.datagram
            )
        )
        if frame.flags & Flag.FIN:
            stream.remote_closed = True
            events.append(ev.StreamEnded(stream_id))

    def _on_data(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        payload = frame.payload
        fin = frame.flags & _FIN
        if not payload and not fin:
            raise RemoteProtocolError("empty DATA frame without FIN")
        stream = self._streams.get(frame.stream_id) or self._table.for_frame(
            frame.stream_id, "DATA"
        )
        if stream is None:
            self._ignored.ignored(now)
            return
        if stream.remote_closed:
            raise RemoteProtocolError(
                f"DATA on stream {frame.stream_id} after its FIN", ErrorCode.STREAM_CLOSED
            )
        if payload:
            stream.recv.received(len(payload))
            events.append(ev.DataReceived(frame.stream_id, payload))
        if fin:
            events.append(ev.StreamEnded(frame.stream_id))
            stream.remote_closed = True
            if stream.local_closed:
                self._forget(frame.stream_id)

    def _on_window_update(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        increment = decode_u32(frame.payload)
        if increment == 0:
            raise RemoteProtocolError("WINDOW_UPDATE with an increment of 0")
        stream = self._table.for_frame(frame.stream_id, "WINDOW_UPDATE")
        if stream is None:
            self._ignored.ignored(now)
            return
        stream.send.grant(increment)
        if stream.local_closed:
            self._ignored.ignored(now)  # nothing more will be sent on it
        else:
            events.append(ev.WindowUpdated(frame.stream_id, increment))

    def _on_reset(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        if self._table.for_frame(frame.stream_id, "RESET") is None:
            self._ignored.ignored(now)
            return
        self._forget(frame.stream_id)
        events.append(
            ev.StreamReset(frame.stream_id, ErrorCode.parse(decode_u32(frame.payload)), True)
        )

    def _on_cluster(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        size = self._extension_u32(frame, Role.CLIENT)
        if not 1 <= size <= wire.MAX_CLUSTER_SIZE:
            raise RemoteProtocolError(
                f"CLUSTER size {size} out of range 1..{wire.MAX_CLUSTER_SIZE}"
            )
        events.append(ev.ClusterSizeChanged(size))

    def _on_join(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        instance = self._extension_u32(frame, Role.SERVER)
        own = self.local_settings.instance_id
        if instance != own:
            raise RemoteProtocolError(f"JOIN for instance {instance:08x}, but this is {own:08x}")
        if self._joined:
            raise RemoteProtocolError("a second JOIN on the same tunnel")
        self._joined = True
        self._awaiting_join = False
        events.append(ev.TunnelJoined(instance))

    def _extension_u32(self, frame: Frame, receiver: Role) -> int:
        """The u32 payload of a cluster-extension frame, after every check the decoder left to
        the connection: the frame exists only on a connection that negotiated the extension and
        only toward `receiver` (else it is an unknown type, as for any peer that never announced
        it), on stream 0, with 4 bytes."""
        if self.role is not receiver or not self.cluster_extension:
            raise RemoteProtocolError(f"unknown frame type 0x{int(frame.type):x}")
        if frame.stream_id != 0:
            raise RemoteProtocolError(
                f"{frame.type.name} frame is not allowed on stream {frame.stream_id}"
            )
        if len(frame.payload) != 4:
            raise RemoteProtocolError(
                f"{frame.type.name} payload must be 4 bytes, got {len(frame.payload)}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        return decode_u32(frame.payload)
