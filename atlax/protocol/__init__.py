"""The Atlax wire protocol as a sans-I/O core: bytes in, typed events out (docs/protocol.md)."""

from .connection import Connection, ConnectionState, KeepaliveConfig, Role
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, error_name
from .events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    SettingsReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from .frames import ALPN, Frame, FrameDecoder, FrameType, Origin, Settings

__all__ = [
    "ALPN",
    "Connection",
    "ConnectionState",
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAwayReceived",
    "KeepaliveConfig",
    "LocalProtocolError",
    "Origin",
    "PongReceived",
    "ProtocolError",
    "RemoteProtocolError",
    "Role",
    "Settings",
    "SettingsReceived",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
    "error_name",
]
