"""Typed events that `Connection.receive_data` and `Connection.handle_timer` return.

Plain (not frozen) slotted dataclasses: one is made per frame, and a frozen dataclass's
`__init__` costs twice as much.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import Origin, Settings


@dataclass(slots=True)
class Event:
    pass


@dataclass(slots=True)
class SettingsReceived(Event):
    settings: Settings


@dataclass(slots=True)
class StreamOpened(Event):
    stream_id: int
    service: str
    origin: Origin | None
    proxy_protocol: int | None = None
    datagram: bool = False  # a UDP flow: its bytes are datagram records (datagrams.py)


@dataclass(slots=True)
class DataReceived(Event):
    stream_id: int
    data: bytes | bytearray  # a bytearray when the frame was read into its own buffer


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed its direction of the stream (FIN)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream is gone: reset by the peer (`remote`), or refused/aborted by this connection."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class WindowUpdated(Event):
    """The peer granted more credit on a stream; blocked senders may go on."""

    stream_id: int
    increment: int


@dataclass(slots=True)
class PongReceived(Event):
    rtt: float


@dataclass(slots=True)
class GoAwayReceived(Event):
    last_stream_id: int
    error_code: int
    message: str


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """This side gave up on the connection (keepalive timeout); GOAWAY is queued to send."""

    error_code: int
    message: str


@dataclass(slots=True)
class ClusterSizeChanged(Event):
    """The relay instance at the other end now expects `size` instances (CLUSTER)."""

    size: int


@dataclass(slots=True)
class TunnelJoined(Event):
    """The agent keeps this tunnel as its tunnel to this instance (JOIN): streams may open."""

    instance_id: int
