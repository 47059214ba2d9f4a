"""Public UDP ports: each client address is a flow, carried over its agent's tunnel.

The first datagram from a new client address runs the port's refusal policy, as a TCP connection
does (allow list, agent offline, flows per port and per source, the agent's stream limit, plus
an agent that does not carry UDP); an admitted one opens a datagram stream and is sent on it at
once. Later datagrams of the flow go straight to it, and the agent's replies go back from the
same socket to the same client. A flow ends after `udp_idle_timeout` without a datagram either
way (one timer per port, re-armed at the table's next deadline), when its agent resets it, or
when the port closes. Nothing waits without bound: a flow's queue is short, and a reply the
socket cannot take at once is dropped (`DatagramDrop`, counted per port).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from typing import TYPE_CHECKING, Any, cast

import anyio

from ..flows import FlowTable
from ..mux import DatagramFlow, TunnelClosedError
from ..protocol import Origin
from .policy import Refusal
from .registry import PublicPort

if TYPE_CHECKING:
    from .ports import PublicPorts

log = logging.getLogger("atlax.relay")

# A reply is dropped rather than queued once the port's socket holds this much unsent.
SOCKET_BACKLOG = 256 * 1024
Address = Any  # (host, port) or (host, port, flowinfo, scope_id), as the socket reports it


class DatagramDrop(enum.StrEnum):
    """Why a datagram of an admitted flow was dropped; the values are metric labels."""

    TUNNEL_FULL = "tunnel_full"  # no credit and the flow's queue full, or the tunnel backed up
    SOCKET_FULL = "socket_full"  # the public socket could not take a reply at once


class UdpPort:
    """One public UDP port: its sockets, its flows by client address, one idle timer."""

    def __init__(self, ports: PublicPorts, public: PublicPort) -> None:
        self.ports = ports
        self.public = public
        self.flows: FlowTable[Address, DatagramFlow] = FlowTable(ports.settings.udp_idle_timeout)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    async def serve(self) -> None:
        try:
            with self.public.scope:
                for sock in self.public.listeners:
                    transport, _ = await self._loop.create_datagram_endpoint(
                        lambda: _PortSocket(self), sock=sock
                    )
                    self.public.transports.append(transport)
                await anyio.sleep_forever()
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for flow in self.flows.flows():
                flow.close()
            self.public.stop_listening()

    def received(self, transport: asyncio.DatagramTransport, data: bytes, address: Address) -> None:
        flow = self.flows.get(address)
        if flow is None:
            flow = self._open(transport, address)
            if flow is None:
                return
        self.flows.touch(address, self._loop.time())
        if not flow.send(data):
            self.ports.observer.datagram_dropped(self.public.key.port, DatagramDrop.TUNNEL_FULL)

    def _open(self, transport: asyncio.DatagramTransport, address: Address) -> DatagramFlow | None:
        binding = self.public.bindings[0]
        origin = _origin(address, transport.get_extra_info("sockname"))
        reason = self.ports.admit(binding, origin)
        session = binding.state.session
        if reason is None and session is not None and not session.datagrams:
            reason = Refusal.NO_DATAGRAMS
        if reason is not None:
            self.ports.refuse(self.public.key.port, origin, reason)
            return None
        assert session is not None
        try:
            flow = session.open_flow_now(binding.service.name, origin)
        except TunnelClosedError:
            return None
        source = origin.source if origin is not None else None
        flow.observer = self.ports.account(binding, flow, source)

        def deliver(datagram: bytes) -> None:
            backlog = cast(asyncio.WriteTransport, transport).get_write_buffer_size()
            if backlog > SOCKET_BACKLOG or transport.is_closing():
                self.ports.observer.datagram_dropped(self.public.key.port, DatagramDrop.SOCKET_FULL)
                return
            transport.sendto(datagram, address)
            self.flows.touch(address, self._loop.time())

        def closed() -> None:
            if self.flows.get(address) is flow:
                self.flows.pop(address)

        flow.attach(deliver, closed)
        self.flows.add(address, flow, self._loop.time())
        if self._timer is None:
            self._arm()
        return flow

    def _arm(self) -> None:
        deadline = self.flows.deadline()
        if deadline is None:
            self._timer = None
            return
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        # A loop timer may fire a little before its time by the loop's clock: never early.
        for flow in self.flows.expire(max(self._timer_at, self._loop.time())):
            flow.close()  # RESET(CANCEL): the agent closes its socket for the flow
        self._arm()


class _PortSocket(asyncio.DatagramProtocol):
    """The protocol of one of a public UDP port's sockets."""

    def __init__(self, port: UdpPort) -> None:
        self._port = port
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        assert self._transport is not None
        self._port.received(self._transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("port %s: %s", self._port.public.text, exc)


def _origin(source: Address, local: Address) -> Origin | None:
    try:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(local[0])
        if src.version != dst.version:
            return None
        return Origin(src, int(source[1]), dst, int(local[1]))
    except (ValueError, TypeError, IndexError):
        return None
