"""Copy bytes both ways between two anyio byte streams, with TCP half-close carried across."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import anyio
import anyio.abc
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import SocketAttribute

CHUNK = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)

Counter = Callable[[int], None]


def _ignore(_: int) -> None:
    pass


async def _splice(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, count: Counter) -> bool:
    """Copy until EOF (then half-close `dst`): True. False if either side failed."""
    try:
        while True:
            try:
                data = await src.receive(CHUNK)
            except EndOfStream:
                await dst.send_eof()
                return True
            await dst.send(data)
            count(len(data))
    except (BrokenResourceError, ClosedResourceError, OSError):
        return False


async def pipe(
    a: anyio.abc.ByteStream,
    b: anyio.abc.ByteStream,
    *,
    a_to_b: Counter = _ignore,
    b_to_a: Counter = _ignore,
) -> bool:
    """Run until both directions reached EOF (True) or either side failed (False).

    The caller closes both streams afterwards; on failure it should abort rather than close
    gracefully (see `abort_socket`).
    """
    ok = True
    async with anyio.create_task_group() as tg:

        async def run(src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream, n: Counter) -> None:
            nonlocal ok
            if not await _splice(src, dst, n):
                ok = False
                tg.cancel_scope.cancel()

        tg.start_soon(run, a, b, a_to_b)
        tg.start_soon(run, b, a, b_to_a)
    return ok


def abort_socket(stream: anyio.abc.ByteStream) -> None:
    """Make the next close send a TCP RST, so the peer sees the failure instead of a clean EOF."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except (OSError, ValueError):  # already closed (uvloop raises ValueError for fd -1)
        pass
