"""The benchmark's services, in their own process (asyncio protocols: cheap per byte).

    sink    counts bytes until EOF, then answers with the count (8 bytes, big-endian)
    echo    sends back what it receives
    hold    accepts and holds connections open (idle streams)
    source  sends forever (a neighbour whose reader stalls)
    udp     a UDP echo: sends each datagram back to where it came from

Prints one JSON line with the five ports, then serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from typing import cast


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        transport = cast(asyncio.Transport, self.transport)
        transport.write(self.count.to_bytes(8, "big"))
        transport.close()
        return True


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class Hold(asyncio.Protocol):
    pass


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


class Source(asyncio.Protocol):
    BLOCK = b"\x5a" * 65536

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=1 << 20)
        self.writing = True
        self._fill()

    def _fill(self) -> None:
        while self.writing and not self.transport.is_closing():
            self.transport.write(self.BLOCK)
            if self.transport.get_write_buffer_size() >= 1 << 20:
                return

    def pause_writing(self) -> None:
        self.writing = False

    def resume_writing(self) -> None:
        self.writing = True
        self._fill()


async def main() -> None:
    loop = asyncio.get_running_loop()
    ports = {}
    servers = []
    for name, factory in (("sink", Sink), ("echo", Echo), ("hold", Hold), ("source", Source)):
        server = await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    ports["udp"] = udp.get_extra_info("sockname")[1]
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    sys.exit(0)
