"""Frames that change nothing, counted: a flood of them is ENHANCE_YOUR_CALM.

WINDOW_UPDATE or RESET for a stream already closed, DATA for a stream this side reset,
WINDOW_UPDATE after this side's FIN, a PING ACK nobody asked for, OPEN after GOAWAY: each costs
the receiver a parse and nothing else, so a flood of them is free for the sender. Some arrive
legitimately (they were in flight when a stream ended), so more are allowed for each stream that
ended in the current second or the one before.
"""

from __future__ import annotations

from .errors import ErrorCode, RemoteProtocolError

IGNORED_FRAMES_PER_SECOND = 1000
IGNORED_FRAMES_PER_ENDED_STREAM = 4


class IgnoredFrames:
    __slots__ = ("_count", "_ended", "_ended_before", "_window_start")

    def __init__(self, now: float) -> None:
        self._window_start = now
        self._count = 0
        self._ended = 0
        self._ended_before = 0

    def stream_ended(self) -> None:
        self._ended += 1

    def ignored(self, now: float) -> None:
        """Count one; raise RemoteProtocolError(ENHANCE_YOUR_CALM) past this second's allowance."""
        if now - self._window_start >= 1.0:
            recent = now - self._window_start < 2.0
            self._ended_before = self._ended if recent else 0
            self._ended = 0
            self._count = 0
            self._window_start = now
        self._count += 1
        ended = self._ended + self._ended_before
        allowed = IGNORED_FRAMES_PER_SECOND + IGNORED_FRAMES_PER_ENDED_STREAM * ended
        if self._count > allowed:
            raise RemoteProtocolError(
                f"more than {allowed} frames in one second that change nothing (frames for "
                "closed streams, unsolicited PING ACKs)",
                ErrorCode.ENHANCE_YOUR_CALM,
            )
