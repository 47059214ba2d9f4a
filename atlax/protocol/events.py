"""Typed events that `Connection.receive_data` and `Connection.handle_timer` return."""

from __future__ import annotations

from dataclasses import dataclass

from .frames import Origin, Settings


@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class SettingsReceived(Event):
    settings: Settings


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    stream_id: int
    service: str
    origin: Origin | None
    proxy_protocol: int | None = None


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    stream_id: int
    data: bytes | bytearray  # a bytearray when the frame was read into its own buffer


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed its direction of the stream (FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream is gone: reset by the peer (`remote`), or refused/aborted by this connection."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class WindowUpdated(Event):
    """The peer granted more credit on a stream; blocked senders may go on."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    rtt: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    last_stream_id: int
    error_code: int
    message: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """This side gave up on the connection (keepalive timeout); GOAWAY is queued to send."""

    error_code: int
    message: str
