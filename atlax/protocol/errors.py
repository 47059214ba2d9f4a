"""Error codes and the two error classes of the wire protocol.

As in h11, the class says whose fault it was: `RemoteProtocolError` when the peer broke a rule of
docs/protocol.md, `LocalProtocolError` when this side's own code misused the API.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x4
    FRAME_SIZE_ERROR = 0x5
    REFUSED_STREAM = 0x6
    CANCEL = 0x7
    CONNECT_FAILED = 0x8
    UNKNOWN_SERVICE = 0x9
    KEEPALIVE_TIMEOUT = 0xA
    UNAUTHORIZED = 0xB
    REPLACED = 0xC
    ENHANCE_YOUR_CALM = 0xD

    @classmethod
    def parse(cls, value: int) -> ErrorCode | int:
        """Known codes as members; unknown ones stay plain numbers (treated as INTERNAL_ERROR)."""
        try:
            return cls(value)
        except ValueError:
            return value


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


class ProtocolError(Exception):
    """A violation of the wire protocol; `error_code` is what goes into GOAWAY or RESET."""

    def __init__(self, message: str, error_code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.error_code.name})"


class RemoteProtocolError(ProtocolError):
    """The peer sent something docs/protocol.md forbids; the tunnel must be closed."""


class LocalProtocolError(ProtocolError):
    """This side asked the connection to do something the protocol forbids (a bug here)."""
