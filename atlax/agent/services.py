"""Where the agent's streams go: the local services it exposes, and nothing else.

The relay only names a service; only services in the agent's own configuration are reachable,
at the addresses the agent chose. A stream becomes the protocol of a TCP connection to its
service, so bytes then move in socket callbacks; a UDP flow gets a UDP socket of its own,
connected to its service, so the service's replies find the flow.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import cast

import anyio
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
)
from proxyprotocol.v2 import ProxyProtocolV2

from ..addresses import HostPort, ServiceTarget
from ..logs import describe
from ..mux import DatagramFlow, MuxStream
from ..protocol import ErrorCode, Origin

log = logging.getLogger("atlax.agent")

# A datagram for a UDP service is dropped rather than queued once its socket holds this much.
SOCKET_BACKLOG = 256 * 1024


class Services:
    """The stream handler of every tunnel: connect each stream to its local service."""

    def __init__(
        self,
        services: Mapping[str, HostPort | ServiceTarget],  # a HostPort is a TCP service
        connect_timeout: float,
    ) -> None:
        self.targets = dict(services)  # the agent's, by name (tests may change them)
        self.connect_timeout = connect_timeout

    async def serve(self, stream: MuxStream) -> None:
        target = self.targets.get(stream.service)
        if target is None or _is_udp(target):
            kind = "unknown service" if target is None else "a TCP stream to UDP service"
            log.warning("relay asked for %s %r; refusing", kind, stream.service)
            stream.reset(ErrorCode.UNKNOWN_SERVICE)
            return
        if stream.proxy_protocol == 2:
            stream.preamble = proxy_v2_header(stream.origin)
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(self.connect_timeout):
                # The stream becomes the socket's protocol: bytes then move in callbacks.
                await loop.create_connection(lambda: stream, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            log.warning(
                "service %r at %s: connect failed: %s", stream.service, target, describe(exc)
            )
            stream.reset(ErrorCode.CONNECT_FAILED)

    async def serve_flow(self, flow: DatagramFlow) -> None:
        """A UDP flow: its own socket, connected to the service, so replies find the flow."""
        target = self.targets.get(flow.service)
        if target is None or not _is_udp(target):
            kind = "unknown service" if target is None else "a UDP flow to TCP service"
            log.warning("relay asked for %s %r; refusing", kind, flow.service)
            flow.close(ErrorCode.UNKNOWN_SERVICE)
            return
        loop = asyncio.get_running_loop()
        try:
            transport, service = await loop.create_datagram_endpoint(
                lambda: _ServiceSocket(flow), remote_addr=(target.host, target.port)
            )
        except OSError as exc:
            log.warning("service %r at %s: %s", flow.service, target, describe(exc))
            flow.close(ErrorCode.CONNECT_FAILED)
            return
        flow.attach(service.deliver, transport.close)


class _ServiceSocket(asyncio.DatagramProtocol):
    """A UDP flow's socket toward its service: datagrams both ways, dropped rather than held."""

    def __init__(self, flow: DatagramFlow) -> None:
        self._flow = flow
        self._transport: asyncio.DatagramTransport | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def deliver(self, datagram: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if cast(asyncio.WriteTransport, transport).get_write_buffer_size() > SOCKET_BACKLOG:
            self.dropped += 1
            return
        transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._flow.send(data)

    def error_received(self, exc: Exception) -> None:
        # ECONNREFUSED: an ICMP port unreachable, the service is down. The relay forgets the
        # flow; the client's next datagram opens a new one.
        log.debug("UDP service %r: %s", self._flow.service, describe(exc))
        self._flow.close(ErrorCode.CONNECT_FAILED)


def _is_udp(target: HostPort | ServiceTarget) -> bool:
    return isinstance(target, ServiceTarget) and target.protocol == "udp"


def proxy_v2_header(origin: Origin | None) -> bytes:
    """The PROXY protocol v2 header naming the public client (LOCAL if the relay sent none)."""
    result: ProxyResult
    if origin is None:
        result = ProxyResultLocal()
    elif origin.source.version == 4:
        result = ProxyResultIPv4(
            (IPv4Address(int(origin.source)), origin.source_port),
            (IPv4Address(int(origin.destination)), origin.destination_port),
            protocol=socket.SOCK_STREAM,
        )
    else:
        result = ProxyResultIPv6(
            (IPv6Address(int(origin.source)), origin.source_port),
            (IPv6Address(int(origin.destination)), origin.destination_port),
            protocol=socket.SOCK_STREAM,
        )
    return ProxyProtocolV2().pack(result)
