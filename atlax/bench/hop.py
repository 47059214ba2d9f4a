"""python -m atlax.bench.hop [--rounds N] [--size BYTES]: the mux's own cost per hop.

Two sessions (relay and agent) in one process, joined by in-memory transports, each with one
stream whose "socket" is in memory too: a message written by the relay's client goes through
the relay's stream, the relay's session, the agent's session and the agent's stream to the
service, which echoes it back the same way. No sockets, no TLS, no event loop turns: what is
left is the protocol core and the shell on the data path. Prints microseconds per hop (one
direction); the figure in docs/performance.md comes from here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import deque
from typing import Any

from ..mux import MuxSession, MuxStream
from ..protocol import Role, Settings

SETTINGS = Settings(initial_window=1 << 20, max_frame_size=256 * 1024, max_streams=16384)


class _Pipe:
    """The tunnel's transport: what one session writes, the other reads (BufferedProtocol)."""

    def __init__(self, inbox: deque[tuple[MuxSession, bytes]]) -> None:
        self.peer: MuxSession | None = None
        self.inbox = inbox

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.peer is not None
        self.inbox.append((self.peer, bytes(data)))

    def writelines(self, items: list[bytes | memoryview]) -> None:
        self.write(b"".join(items))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Socket(_Pipe):
    """A stream's socket: what the stream writes lands in `on_write`."""

    def __init__(self, inbox: deque[tuple[MuxSession, bytes]], on_write: Any) -> None:
        super().__init__(inbox)
        self.on_write = on_write
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.on_write(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _deliver(inbox: deque[tuple[MuxSession, bytes]]) -> None:
    while inbox:
        session, data = inbox.popleft()
        view = memoryview(data)
        while view:
            buffer = session.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            session.buffer_updated(n)
            view = view[n:]


async def measure(rounds: int, size: int) -> list[float]:
    inbox: deque[tuple[MuxSession, bytes]] = deque()
    echoed: list[bytes] = []

    async def accept(stream: MuxStream) -> None:  # pragma: no cover - handlers need run()
        raise AssertionError

    relay = MuxSession(Role.SERVER, settings=SETTINGS, name="relay")
    agent = MuxSession(Role.CLIENT, settings=SETTINGS, handler=accept, name="agent")
    to_agent, to_relay = _Pipe(inbox), _Pipe(inbox)
    to_agent.peer, to_relay.peer = agent, relay
    relay.connection_made(to_agent)  # type: ignore[arg-type]
    agent.connection_made(to_relay)  # type: ignore[arg-type]
    _deliver(inbox)

    relay_stream = relay.open_stream_now("echo")
    relay_stream.connection_made(_Socket(inbox, echoed.append))  # type: ignore[arg-type]
    _deliver(inbox)
    [agent_stream] = agent.streams
    agent_stream.connection_made(_Socket(inbox, agent_stream.data_received))  # type: ignore[arg-type]

    message = bytes(size)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        relay_stream.data_received(message)
        _deliver(inbox)
        samples.append((time.perf_counter() - start) / 2)  # a round trip is two hops
    assert sum(map(len, echoed)) == rounds * size, "the echo lost bytes"
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    samples = asyncio.run(measure(args.rounds, args.size))
    warm = sorted(samples[len(samples) // 10 :])
    median = statistics.median(warm) * 1e6
    p10 = warm[len(warm) // 10] * 1e6
    print(f"{args.size} B, {len(warm)} round trips: {median:.2f} µs per hop (p10 {p10:.2f})")


if __name__ == "__main__":
    main()
