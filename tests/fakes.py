"""In-memory stand-ins for what a protocol object sees of asyncio, for deterministic shell tests
(as uvicorn drives its protocols with a MockTransport and a mock loop): a transport whose
"kernel" takes only what the test allows, and a clock that is also the loop's timer wheel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from atlax.mux import MuxSession
from atlax.protocol import Connection, Event, Role, Settings
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import Frame


class FakeTransport:
    """asyncio.Transport semantics in memory. Written bytes go to `sent` ("the kernel") as far
    as `room` allows (None: all), the rest waits in a write buffer with asyncio's high/low
    water marks; `drain()` lets the kernel take the buffer. Reading is a flag."""

    def __init__(self, protocol: asyncio.BaseProtocol, *, sock: Any = None) -> None:
        self.protocol = protocol
        self.sock = sock
        self.sent = bytearray()
        self.buffer = bytearray()
        self.room: int | None = None
        self.reading = True
        self.eof_written = False
        self.closing = False
        self.aborted = False
        self.high, self.low = 64 * 1024, 16 * 1024
        self.paused = False
        self.pauses = 0

    # -- the Transport API -----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self.buffer:
            self.buffer += data
        else:
            take = len(data) if self.room is None else min(self.room, len(data))
            if self.room is not None:
                self.room -= take
            self.sent += data[:take]
            self.buffer += data[take:]
        if not self.paused and len(self.buffer) > self.high:
            self.paused = True
            self.pauses += 1
            self.protocol.pause_writing()

    def writelines(self, items: list[bytes | memoryview]) -> None:
        self.write(b"".join(items))

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        self.high, self.low = high, high // 4 if low is None else low

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" and self.sock is not None else default

    # -- the test's side -------------------------------------------------------------------

    def drain(self, n: int | None = None) -> None:
        """The kernel takes `n` buffered bytes (all if None); resume_writing as asyncio would."""
        n = len(self.buffer) if n is None else n
        self.sent += self.buffer[:n]
        del self.buffer[:n]
        if self.paused and len(self.buffer) <= self.low:
            self.paused = False
            self.protocol.resume_writing()

    def take(self) -> bytes:
        """What was sent since the last take."""
        out, self.sent = bytes(self.sent), bytearray()
        return out


class _Handle:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock (call it for the time) that is also the loop's `call_later`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self._timers: list[_Handle] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> _Handle:
        handle = _Handle(self.now + delay, callback)
        self._timers.append(handle)
        return handle

    @property
    def next_timer(self) -> float | None:
        live = [t.when for t in self._timers if not t.cancelled]
        return min(live) if live else None

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass, firing every timer that falls due on the way, in order."""
        target = self.now + seconds
        for _ in range(10_000):
            due = [t for t in self._timers if not t.cancelled and t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self._timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback()
        else:
            raise AssertionError("timers kept firing")
        self.now = target

    def stall(self, seconds: float) -> None:
        """The loop was busy: time passes and no timer fired. They fire at the next advance."""
        self.now += seconds


def feed(session: MuxSession, data: bytes) -> None:
    """Deliver bytes to the session the way a BufferedProtocol transport does."""
    view = memoryview(data)
    while view:
        buffer = session.get_buffer(-1)
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        session.buffer_updated(n)
        view = view[n:]


def frames(data: bytes) -> list[Frame]:
    return list(FrameDecoder(1 << 24).feed(data))


class Link:
    """A session over a fake transport, with a real core as the peer at the other end."""

    def __init__(
        self,
        role: Role,
        *,
        settings: Settings | None = None,
        peer_settings: Settings | None = None,
        clock: FakeClock | None = None,
        **session_kw: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.session = MuxSession(
            role, settings=settings, clock=self.clock, loop=self.clock, **session_kw
        )
        peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.peer = Connection(peer_role, peer_settings, now=self.clock())
        self.transport = FakeTransport(self.session)
        self.session.connection_made(self.transport)  # type: ignore[arg-type]

    def pump(self) -> list[Event]:
        """Both ways until quiet; return the peer's events."""
        got: list[Event] = []
        for _ in range(100):
            sent = self.transport.take()
            if sent:
                got += self.peer.receive_data(sent, now=self.clock())
            back = self.peer.data_to_send()
            if back:
                feed(self.session, back)
            if not sent and not back:
                return got
        raise AssertionError("never quiet")
