"""Which streams may read their sockets now: read credit and the tunnel's pause/resume.

Kept apart from the streams and the session, as uvicorn keeps `FlowControl`: it never touches a
socket. A stream asks `wants()` whenever something changed (it read, credit arrived, it
connected) and pauses or resumes its socket by the answer; the session calls `pause()` and
`resume()` when the tunnel's transport passes its high- and low-water marks, and the scheduler
asks every stream concerned to look again.

The rules:
- A stream reads only with a read's worth of credit left (`read_credit`) and nothing waiting for
  credit, so a read never waits in memory.
- When the tunnel's buffer passes its high-water mark, every stream that may read stops at once:
  each would otherwise add one more read to the buffer. "May read" means told yes by `wants()`
  since the last pause, which covers every stream that read or was resumed since. Idle streams
  (thousands of them, on a relay) are not visited: a stream that has not read for
  `RECENT_PAUSES` pauses and has no input waiting in its socket is let go when the tunnel
  resumes. It still reads, untracked, and is tracked again from its next read on; if that read
  comes while the tunnel is full, it adds one read to the buffer, once.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

# A socket read takes up to 256 KiB (uvloop's read buffer): a stream reads only with that much
# credit left (or half the window, if the peer's window is smaller).
READ_CREDIT = 256 * 1024
# A stream that read within this many pauses of the tunnel counts as reading.
RECENT_PAUSES = 8


class Reader(Protocol):
    def update_reading(self) -> None:
        """Ask `wants()` again and pause or resume the socket by the answer."""

    def has_input(self) -> bool:
        """Bytes wait unread in the socket (tells a stream that lost the race from an idle one)."""


R = TypeVar("R", bound=Reader)


class ReadScheduler(Generic[R]):
    __slots__ = ("_blocked", "_let_go", "_pauses", "_read_at", "_watch", "paused", "read_credit")

    def __init__(self) -> None:
        self.paused = False  # the tunnel's buffer is above its high-water mark
        self.read_credit = READ_CREDIT
        self._pauses = 0
        # Told yes since the last pause (True: and read). Dicts as ordered sets: deterministic.
        self._watch: dict[R, bool] = {}
        self._blocked: dict[R, None] = {}  # stopped while paused: to resume
        self._read_at: dict[R, int] = {}  # pause count at the last read (streams in the cycle)
        self._let_go: set[R] = set()  # idle streams being resumed without tracking

    def set_peer_window(self, initial_window: int) -> None:
        """The peer's INITIAL_WINDOW: a read needs at most half of it in credit."""
        self.read_credit = min(READ_CREDIT, initial_window // 2)

    def wants(self, stream: R, send_window: int, backlogged: bool, read: bool = False) -> bool:
        """Should `stream`'s socket be reading now? `read`: it just read."""
        if self.paused:
            self._blocked[stream] = None
            if read:
                self._read_at[stream] = self._pauses
            return False
        if backlogged or send_window < self.read_credit:
            return False  # it cannot read until credit arrives, and then it asks again
        if read:
            self._watch[stream] = True
        elif not (self._let_go and stream in self._let_go):
            self._watch.setdefault(stream, False)
        return True

    def pause(self) -> None:
        """The tunnel's buffer passed its high-water mark: stop every stream that may read."""
        self.paused = True
        watch, self._watch = self._watch, {}
        for stream, did_read in watch.items():
            if did_read:
                self._read_at[stream] = self._pauses
        self._pauses += 1
        for stream in watch:
            stream.update_reading()  # -> wants() -> blocked

    def resume(self) -> None:
        """The tunnel's buffer drained below its low-water mark: resume what was stopped."""
        self.paused = False
        blocked, self._blocked = self._blocked, {}
        pauses, read_at = self._pauses, self._read_at
        for stream in blocked:
            recent = pauses - read_at.get(stream, -RECENT_PAUSES - 1) <= RECENT_PAUSES
            if not recent and not stream.has_input():
                self._let_go.add(stream)
        for stream in blocked:
            stream.update_reading()
        for stream in self._let_go:
            read_at.pop(stream, None)
        self._let_go.clear()

    def forget(self, stream: R) -> None:
        """`stream` is gone."""
        self._watch.pop(stream, None)
        self._blocked.pop(stream, None)
        self._read_at.pop(stream, None)
        self._let_go.discard(stream)

    @property
    def tracked(self) -> int:
        """Streams the next pause will visit (for tests and diagnostics)."""
        return len(self._watch)
