"""The tunnel's state machine: bytes in, typed events out, bytes to send. No I/O, no clock.

Modelled on h2's `H2Connection` and aioquic's `QuicConnection`: the caller feeds received bytes with
`receive_data(data, now)`, acts on the returned events, calls methods such as `send_data`, and
writes whatever `data_to_send()` returns. Time is an argument; keepalive is driven by asking
`get_timer()` when to call `handle_timer(now)`.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from . import events as ev
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, error_name
from .flow import ReceiveWindow, SendWindow
from .frames import (
    HEADER,
    MAX_STREAM_ID,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    Origin,
    Settings,
    decode_goaway_payload,
    decode_open_payload,
    decode_settings,
    decode_u32,
    encode_frame,
    encode_goaway_payload,
    encode_header,
    encode_open_payload,
    encode_settings,
    encode_u32,
)

# Frames that arrive for streams this side reset are ignored; remember that many such ids.
RESET_MEMORY = 4096
# More PINGs than this per second from the peer is a flood.
MAX_PINGS_PER_SECOND = 100
# A peer that keeps opening streams we must refuse (beyond MAX_STREAMS) is flooding.
MAX_REFUSED_STREAMS = 1000


# Payloads this large are written as they are rather than joined with their neighbours.
_SEPARATE_WRITE = 16_384
# Plain ints: enum arithmetic and calls are slow on the per-frame path.
_FIN = int(Flag.FIN)
_DATA = int(FrameType.DATA)


class Role(enum.Enum):
    CLIENT = "client"  # dialled the connection (the agent): odd stream ids
    SERVER = "server"  # accepted it (the relay): even stream ids


class ConnectionState(enum.Enum):
    OPEN = "open"  # includes the short time before the peer's SETTINGS arrive
    CLOSED = "closed"  # GOAWAY with an error was sent or the connection failed


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    interval: float  # send PING after this long without receiving anything
    timeout: float  # give up after this long without receiving anything

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.timeout:
            raise ValueError("keepalive needs 0 < interval < timeout")


class _Stream:
    __slots__ = ("local_closed", "recv", "remote_closed", "send", "stream_id")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send = SendWindow(send_window)
        self.recv = ReceiveWindow(recv_window)
        self.local_closed = False  # we sent FIN
        self.remote_closed = False  # peer sent FIN


class Connection:
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
        self.state = ConnectionState.OPEN
        self.keepalive = keepalive
        self._decoder = FrameDecoder(self.local_settings.max_frame_size)
        self._out: list[bytes | memoryview] = [encode_settings(self.local_settings)]
        self._out_bytes = len(self._out[0])
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._last_peer_id = 0
        self._local_open = 0  # live streams this side opened
        self._peer_open = 0  # live streams the peer opened
        self._reset_by_us: OrderedDict[int, None] = OrderedDict()
        self._refused = 0
        self._goaway_sent: int | None = None  # last peer stream id promised in our GOAWAY
        self._goaway_received: int | None = None
        self._last_received = now
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._ping_window_start = now
        self._pings_in_window = 0
        self.last_rtt: float | None = None

    # -- inspection --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The peer's SETTINGS arrived and the connection is usable for streams."""
        return self.peer_settings is not None and self.state is ConnectionState.OPEN

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def last_received(self) -> float:
        return self._last_received

    @property
    def can_open_stream(self) -> bool:
        return (
            self.ready
            and self._goaway_received is None
            and self._goaway_sent is None
            and self.peer_settings is not None
            and self._local_open < self.peer_settings.max_streams
            and self._next_local_id <= MAX_STREAM_ID
        )

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return stream.send.available

    def max_outbound_frame(self) -> int:
        return self.peer_settings.max_frame_size if self.peer_settings else 16_384

    def buffered_receive(self, stream_id: int) -> int:
        """Bytes received on the stream and not yet granted back (at most its window)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.recv.size - stream.recv.available

    def is_stream_live(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- output ------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return b"".join(self.data_to_send_chunks())

    def data_to_send_chunks(self) -> list[bytes | memoryview]:
        """What to write, as a list for `writelines`: small frames joined into one item (one TLS
        record, one syscall), large payloads left as views of the data given to `send_data`, so
        that data must not change until the transport has taken it."""
        out = self._out
        if not out:
            return []
        self._out = []
        self._out_bytes = 0
        if len(out) == 1:
            return out
        chunks: list[bytes | memoryview] = []
        run: list[bytes | memoryview] = []
        for item in out:
            if len(item) >= _SEPARATE_WRITE:
                if run:
                    chunks.append(b"".join(run))
                    run = []
                chunks.append(item)
            else:
                run.append(item)
        if run:
            chunks.append(b"".join(run))
        return chunks

    @property
    def bytes_pending(self) -> int:
        return self._out_bytes

    def _emit(self, frame: bytes | memoryview) -> None:
        self._out.append(frame)
        self._out_bytes += len(frame)

    # -- local actions -----------------------------------------------------------------------

    def open_stream(
        self, service: str, origin: Origin | None = None, proxy_protocol: int | None = None
    ) -> int:
        self._require_open()
        if not self.can_open_stream:
            raise LocalProtocolError("cannot open a stream now", ErrorCode.REFUSED_STREAM)
        assert self.peer_settings is not None
        payload = encode_open_payload(service, origin, proxy_protocol)
        stream_id = self._next_local_id
        self._next_local_id += 2
        self._streams[stream_id] = _Stream(
            stream_id, self.peer_settings.initial_window, self.local_settings.initial_window
        )
        self._local_open += 1
        self._emit(encode_frame(FrameType.OPEN, 0, stream_id, payload))
        return stream_id

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue `data` (within the stream's credit), split into frames the peer accepts."""
        self._require_open()
        stream = self._live_stream(stream_id)
        if stream.local_closed:
            raise LocalProtocolError(f"stream {stream_id} was already half-closed by this side")
        length = len(data)
        stream.send.spend(length)
        step = self.max_outbound_frame()
        if 0 < length < _SEPARATE_WRITE and length <= step:  # the common small write: one item
            flags = _FIN if end_stream else 0
            frame = HEADER.pack(stream_id, length, _DATA, flags, 0) + data
            self._out.append(frame)
            self._out_bytes += len(frame)
        else:
            view = memoryview(data)
            for offset in range(0, length, step):
                chunk = view[offset : offset + step]
                last = offset + step >= length
                flags = _FIN if (end_stream and last) else 0
                self._emit(encode_header(FrameType.DATA, flags, stream_id, len(chunk)))
                self._emit(chunk)
            if end_stream and length == 0:
                self._emit(encode_header(FrameType.DATA, Flag.FIN, stream_id, 0))
        if end_stream:
            self._close_local(stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream. Resetting a stream that is already gone does nothing."""
        if self.state is ConnectionState.CLOSED:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._emit(encode_frame(FrameType.RESET, 0, stream_id, encode_u32(error_code)))
        self._forget(stream_id)
        self._remember_reset(stream_id)

    def acknowledge_received_data(self, stream_id: int, length: int) -> None:
        """The application consumed `length` bytes of the stream; maybe grant more credit."""
        stream = self._streams.get(stream_id)
        if stream is None or self.state is ConnectionState.CLOSED:
            return
        increment = stream.recv.consumed(length)
        if increment and not stream.remote_closed:
            self._emit(encode_frame(FrameType.WINDOW_UPDATE, 0, stream_id, encode_u32(increment)))

    def ping(self, now: float) -> None:
        """Send a PING now (if none is outstanding) to measure the round trip."""
        self._require_open()
        if self._ping_sent_at is None:
            self._ping_payload = os.urandom(8)
            self._ping_sent_at = now
            self._emit(encode_frame(FrameType.PING, 0, 0, self._ping_payload))

    def close(self, error_code: int = ErrorCode.NO_ERROR, message: str = "") -> None:
        """Send GOAWAY. With NO_ERROR existing streams may finish; else the connection is over."""
        if self.state is ConnectionState.CLOSED:
            return
        if self._goaway_sent is None or error_code != ErrorCode.NO_ERROR:
            self._goaway_sent = self._last_peer_id
            payload = encode_goaway_payload(self._last_peer_id, error_code, message[:512])
            self._emit(encode_frame(FrameType.GOAWAY, 0, 0, payload))
        if error_code != ErrorCode.NO_ERROR:
            self.state = ConnectionState.CLOSED

    # -- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        if self.keepalive is None or self.state is ConnectionState.CLOSED:
            return None
        ka = self.keepalive
        base = self._last_received if self._ping_sent_at is None else self._ping_sent_at
        return min(base + ka.interval, self._last_received + ka.timeout)

    def handle_timer(self, now: float) -> list[ev.Event]:
        if self.keepalive is None or self.state is ConnectionState.CLOSED:
            return []
        ka = self.keepalive
        if now >= self._last_received + ka.timeout:
            message = f"nothing received from the peer for {ka.timeout:g}s"
            self.close(ErrorCode.KEEPALIVE_TIMEOUT, message)
            return [ev.ConnectionTerminated(ErrorCode.KEEPALIVE_TIMEOUT, message)]
        base = self._last_received if self._ping_sent_at is None else self._ping_sent_at
        if now >= base + ka.interval:
            self._ping_sent_at = None  # an unanswered ping is simply replaced
            self.ping(now)
        return []

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[ev.Event]:
        """Feed bytes read from the transport. Raises RemoteProtocolError if the peer broke a
        rule; GOAWAY with the error code is then queued and the connection is closed."""
        if self.state is ConnectionState.CLOSED:
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
        if self.state is ConnectionState.CLOSED:
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
                if self.peer_settings is None:
                    self._handle_settings(frame, events)
                else:
                    _HANDLERS[frame.type](self, frame, now, events)
        except ProtocolError as exc:
            self._fail(exc)
        return events

    def _fail(self, exc: ProtocolError) -> NoReturn:
        """The peer broke a rule: queue GOAWAY with the error, close, and raise."""
        self.close(exc.error_code, str(exc.args[0]))
        self.state = ConnectionState.CLOSED
        if isinstance(exc, LocalProtocolError):  # an internal check tripped on peer input
            raise RemoteProtocolError(str(exc.args[0]), exc.error_code) from exc
        raise exc

    def _handle_settings(self, frame: Frame, events: list[ev.Event]) -> None:
        if frame.type is not FrameType.SETTINGS:
            raise RemoteProtocolError(f"first frame must be SETTINGS, got {frame.type.name}")
        self.peer_settings = decode_settings(frame.payload)
        events.append(ev.SettingsReceived(self.peer_settings))

    def _on_settings(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        raise RemoteProtocolError("SETTINGS may be sent only once")

    def _on_ping(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        if frame.flags & Flag.ACK:
            if self._ping_sent_at is not None and frame.payload == self._ping_payload:
                self.last_rtt = max(0.0, now - self._ping_sent_at)
                self._ping_sent_at = None
                events.append(ev.PongReceived(self.last_rtt))
            return
        if now - self._ping_window_start >= 1.0:
            self._ping_window_start = now
            self._pings_in_window = 0
        self._pings_in_window += 1
        if self._pings_in_window > MAX_PINGS_PER_SECOND:
            raise RemoteProtocolError(
                "more than 100 PINGs in one second", ErrorCode.ENHANCE_YOUR_CALM
            )
        self._emit(encode_frame(FrameType.PING, Flag.ACK, 0, frame.payload))

    def _on_goaway(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        last_id, code, message = decode_goaway_payload(frame.payload)
        self._goaway_received = last_id
        events.append(ev.GoAwayReceived(last_id, ErrorCode.parse(code), message))
        # Our streams above the peer's last id were never processed: they are refused.
        for stream_id in [s for s in self._streams if self._is_local(s) and s > last_id]:
            self._forget(stream_id)
            events.append(ev.StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=True))

    def _on_open(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        stream_id = frame.stream_id
        if self._is_local(stream_id):
            raise RemoteProtocolError(f"OPEN for stream {stream_id}, which has this side's parity")
        if stream_id <= self._last_peer_id:
            raise RemoteProtocolError(
                f"OPEN for stream {stream_id}, not above {self._last_peer_id}"
            )
        request = decode_open_payload(frame.payload)
        self._last_peer_id = stream_id
        if self._goaway_sent is not None:
            self._remember_reset(stream_id)  # after our GOAWAY: ignored, the peer retries elsewhere
            return
        if self._peer_open >= self.local_settings.max_streams:
            self._refused += 1
            if self._refused > MAX_REFUSED_STREAMS:
                raise RemoteProtocolError(
                    f"peer opened more than {MAX_REFUSED_STREAMS} streams beyond MAX_STREAMS",
                    ErrorCode.ENHANCE_YOUR_CALM,
                )
            self._emit(
                encode_frame(FrameType.RESET, 0, stream_id, encode_u32(ErrorCode.REFUSED_STREAM))
            )
            self._remember_reset(stream_id)
            events.append(ev.StreamReset(stream_id, ErrorCode.REFUSED_STREAM, remote=False))
            return
        assert self.peer_settings is not None
        stream = _Stream(
            stream_id, self.peer_settings.initial_window, self.local_settings.initial_window
        )
        self._streams[stream_id] = stream
        self._peer_open += 1
        events.append(
            ev.StreamOpened(stream_id, request.service, request.origin, request.proxy_protocol)
        )
        if frame.flags & Flag.FIN:
            stream.remote_closed = True
            events.append(ev.StreamEnded(stream_id))

    def _on_data(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        payload = frame.payload
        fin = frame.flags & _FIN
        if not payload and not fin:
            raise RemoteProtocolError("empty DATA frame without FIN")
        stream = self._streams.get(frame.stream_id) or self._stream_for_frame(frame)
        if stream is None:
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
        stream = self._stream_for_frame(frame, closed_ok=True)
        if stream is None:
            return
        stream.send.grant(increment)
        if not stream.local_closed:
            events.append(ev.WindowUpdated(frame.stream_id, increment))

    def _on_reset(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        stream = self._stream_for_frame(frame, closed_ok=True)
        if stream is None:
            return
        self._forget(frame.stream_id)
        events.append(
            ev.StreamReset(frame.stream_id, ErrorCode.parse(decode_u32(frame.payload)), True)
        )

    # -- helpers -----------------------------------------------------------------------------

    def _stream_for_frame(self, frame: Frame, *, closed_ok: bool = False) -> _Stream | None:
        """The live stream a frame is for; None if the frame is to be ignored; else an error."""
        stream = self._streams.get(frame.stream_id)
        if stream is not None:
            return stream
        stream_id = frame.stream_id
        if stream_id in self._reset_by_us:
            return None
        allocated = (
            stream_id < self._next_local_id
            if self._is_local(stream_id)
            else (stream_id <= self._last_peer_id)
        )
        if not allocated:
            raise RemoteProtocolError(f"{frame.type.name} for stream {stream_id}, never opened")
        if closed_ok:
            return None
        raise RemoteProtocolError(
            f"{frame.type.name} for stream {stream_id}, already closed", ErrorCode.STREAM_CLOSED
        )

    def _is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.CLIENT)

    def _live_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open", ErrorCode.STREAM_CLOSED)
        return stream

    def _close_local(self, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream.stream_id)

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            if self._is_local(stream_id):
                self._local_open -= 1
            else:
                self._peer_open -= 1

    def _remember_reset(self, stream_id: int) -> None:
        self._reset_by_us[stream_id] = None
        if len(self._reset_by_us) > RESET_MEMORY:
            self._reset_by_us.popitem(last=False)

    def _require_open(self) -> None:
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError("the connection is closed")


_HANDLERS = {
    FrameType.DATA: Connection._on_data,
    FrameType.OPEN: Connection._on_open,
    FrameType.WINDOW_UPDATE: Connection._on_window_update,
    FrameType.RESET: Connection._on_reset,
    FrameType.PING: Connection._on_ping,
    FrameType.GOAWAY: Connection._on_goaway,
    FrameType.SETTINGS: Connection._on_settings,
}

__all__ = ["Connection", "ConnectionState", "KeepaliveConfig", "Role", "error_name"]
