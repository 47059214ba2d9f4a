"""The Atlax wire protocol as a sans-I/O core: bytes in, typed events out (docs/protocol.md)."""

from .connection import Connection, Role
from .decoder import FrameDecoder
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError, error_name
from .events import (
    ClusterSizeChanged,
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    SettingsReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TunnelJoined,
    WindowUpdated,
)
from .frames import ALPN, Frame, FrameType, Origin, Settings
from .keepalive import KeepaliveConfig
from .state import ConnectionEnd, ConnectionState, EndReason

__all__ = [
    "ALPN",
    "ClusterSizeChanged",
    "Connection",
    "ConnectionEnd",
    "ConnectionState",
    "ConnectionTerminated",
    "DataReceived",
    "EndReason",
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
    "TunnelJoined",
    "WindowUpdated",
    "error_name",
]
