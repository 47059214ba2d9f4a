"""Per-stream credit accounting, kept apart from the connection as h2 keeps `WindowManager`."""

from __future__ import annotations

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import MAX_WINDOW


class ReceiveWindow:
    """Credit this side granted the peer on one stream, and when to grant more.

    Granted credit shrinks as DATA arrives and grows again only when the application says it has
    consumed bytes. So the bytes buffered for a stream that nobody reads never exceed `size`.
    An update is worth sending once half of the window has been consumed: fewer, larger updates.
    """

    __slots__ = ("_available", "_consumed", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._available = size
        self._consumed = 0  # consumed by the application but not yet granted back

    @property
    def available(self) -> int:
        return self._available

    def received(self, length: int) -> None:
        if length > self._available:
            raise RemoteProtocolError(
                f"peer sent {length} bytes with only {self._available} bytes of credit",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self._available -= length

    def grow(self, extra: int) -> None:
        """Raise the window by `extra` (the receiver decided this stream may have more in
        flight); the credit goes out with the next update, which this makes due at once."""
        if extra < 0 or self.size + extra > MAX_WINDOW:
            raise LocalProtocolError(f"cannot grow a window of {self.size} by {extra}")
        self.size += extra
        self._consumed += extra

    def consumed(self, length: int) -> int:
        """Record `length` bytes handed to the application; return the increment to send (or 0)."""
        if length < 0:
            raise LocalProtocolError("cannot consume a negative number of bytes")
        self._consumed += length
        outstanding = self._available + self._consumed
        if outstanding > self.size:
            raise LocalProtocolError("consumed more bytes than were received")
        if self._consumed * 2 >= self.size:
            increment, self._consumed = self._consumed, 0
            self._available += increment
            return increment
        return 0


class SendWindow:
    """Credit the peer granted this side on one stream."""

    __slots__ = ("available",)

    def __init__(self, size: int) -> None:
        self.available = size

    def spend(self, length: int) -> None:
        if length > self.available:
            raise LocalProtocolError(
                f"cannot send {length} bytes with {self.available} bytes of credit",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.available -= length

    def grant(self, increment: int) -> None:
        if not 1 <= increment <= MAX_WINDOW:
            raise RemoteProtocolError(f"WINDOW_UPDATE increment {increment} is out of range")
        if self.available + increment > MAX_WINDOW:
            raise RemoteProtocolError(
                "WINDOW_UPDATE overflows the window above 2^31-1", ErrorCode.FLOW_CONTROL_ERROR
            )
        self.available += increment
