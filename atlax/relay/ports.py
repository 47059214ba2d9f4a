"""Public ports: accept a client, decide whether it may in, and join it to a new stream.

A refused client is closed at once with a TCP RST, counted by `Refusal` (whose values are the
`atlax_connections_refused_total` labels) and logged at a limited rate. An admitted one becomes
a stream of its agent's tunnel and from then on lives in socket callbacks, with no task. On a
port shared by hostname, `routing.py` first reads which service the client wants.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from enum import StrEnum
from typing import Any

import anyio
import anyio.abc

from ..config import RelaySettings
from ..logs import RateLimitedLog
from ..mux import DatagramFlow, MuxStream, StreamObserver, TunnelClosedError
from ..net import accept_sockets, close_with_reset, origin_of, set_keepalive
from ..protocol import Origin
from .observer import RelayObserver
from .registry import AgentState, PortBinding, PublicPort

log = logging.getLogger("atlax.relay")


class Refusal(StrEnum):
    """Why a public connection is closed at once. The value is the metric label, `text` the
    reason the log line gives. Checked in this order: the first that applies is the reason."""

    SOURCE_DENIED = "source_denied", "source address not in the port's allow list"
    AGENT_OFFLINE = "agent_offline", "its agent is offline"
    PORT_LIMIT = "port_limit", "the port is at its max_connections limit"
    SOURCE_LIMIT = (
        "source_limit",
        "that source address is at max_connections_per_source on this port",
    )
    AGENT_LIMIT = "agent_limit", "the agent is at its max_streams limit"
    NO_DATAGRAMS = "agent_no_udp", "its agent does not carry UDP (an agent from before UDP)"
    # A port shared by hostname (routing.py): what the first bytes said, or did not.
    NOT_TLS = "not_tls", "not a TLS ClientHello"
    NOT_HTTP = "not_http", "not an HTTP request"
    MALFORMED = "malformed", "a malformed ClientHello or request head"
    TOO_LARGE = "too_large", "a ClientHello or request head over the size limit"
    ROUTE_TIMEOUT = "route_timeout", "no complete ClientHello or request head within route_timeout"
    NO_HOSTNAME = "no_hostname", "it named no hostname (no SNI, no Host)"
    UNKNOWN_HOST = "unknown_host", "no service on this port serves the hostname it asked for"

    text: str

    def __new__(cls, label: str, text: str) -> Refusal:
        member = str.__new__(cls, label)
        member._value_ = label
        member.text = text
        return member


def refusal(binding: PortBinding, origin: Origin | None, settings: RelaySettings) -> Refusal | None:
    """Why a new public connection on `binding` must be closed at once, or None to serve it."""
    service = binding.service
    if service.allow and (
        origin is None or not any(_contains(net, origin.source) for net in service.allow)
    ):
        return Refusal.SOURCE_DENIED
    state = binding.state
    session = state.session
    if session is None or not session.can_open_stream:
        return Refusal.AGENT_OFFLINE
    if binding.connections >= (service.max_connections or settings.max_connections_per_port):
        return Refusal.PORT_LIMIT
    per_source = settings.max_connections_per_source
    if origin is not None and binding.by_source.get(origin.source, 0) >= per_source:
        return Refusal.SOURCE_LIMIT
    if session.active_streams >= (state.spec.max_streams or settings.max_streams_per_agent):
        return Refusal.AGENT_LIMIT
    return None


def _contains(network: ipaddress.IPv4Network | ipaddress.IPv6Network, address: Any) -> bool:
    if network.version != address.version:
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d from a dual-stack socket
        return mapped is not None and mapped in network
    return bool(address in network)


class PublicPorts:
    """Serves the registry's public ports; `serve` is the registry's `serve_port`."""

    def __init__(self, settings: RelaySettings, observer: RelayObserver) -> None:
        self.settings = settings
        self.observer = observer
        self.task_group: anyio.abc.TaskGroup | None = None  # the relay's, set while it serves
        self._refusals = RateLimitedLog(log)
        from .routing import Router  # routing.py builds on this module's Refusal and join

        self._router = Router(self)

    def serve(self, public: PublicPort) -> None:
        """Start serving a newly opened port (until `public.close()`)."""
        assert self.task_group is not None, "ports are opened only while the relay serves"
        if public.key.protocol == "udp":
            from .udp import UdpPort  # udp.py builds on this module, as routing.py does

            self.task_group.start_soon(UdpPort(self, public).serve)
        else:
            self.task_group.start_soon(self._accept, public)

    async def _accept(self, public: PublicPort) -> None:
        async def handle(client: socket.socket) -> None:
            if public.route is None:
                await self._join(public.bindings[0], client)
            else:
                await self._router.take(public, client)

        try:
            with public.scope:
                async with anyio.create_task_group() as tg:
                    for sock in public.listeners:
                        tg.start_soon(accept_sockets, sock, handle)
        finally:
            public.stop_listening()

    def refuse(
        self, port: int, origin: Origin | None, reason: Refusal, detail: str | None = None
    ) -> None:
        """Count and log (at a limited rate) a client closed before it reached an agent."""
        self.observer.connection_refused(port, reason)
        where = f"{origin.source}:{origin.source_port}" if origin else "unknown peer"
        self._refusals.warning(
            f"{port}/{reason}",
            "port %d: closed connection from %s: %s",
            port,
            where,
            detail or reason.text,
        )

    def open_stream(self, binding: PortBinding, origin: Origin | None) -> MuxStream | None:
        """A new stream for a client the policy admits; None if refused (counted) or if the
        tunnel just closed."""
        reason = refusal(binding, origin, self.settings)
        if reason is not None:
            self.refuse(binding.service.port, origin, reason)
            return None
        service, state = binding.service, binding.state
        assert state.session is not None
        try:
            proxy = 2 if service.proxy_protocol == "v2" else None
            stream = state.session.open_stream_now(service.name, origin, proxy)
        except TunnelClosedError:
            return None
        source = origin.source if origin is not None else None
        stream.observer = PublicConnection(self.observer, binding, state, stream, source)
        return stream

    async def _join(self, binding: PortBinding, client: socket.socket) -> None:
        """Join a public connection to a new stream; from then on it lives in callbacks."""
        stream = self.open_stream(binding, origin_of(client))
        if stream is None:
            close_with_reset(client)
            return
        set_keepalive(client)  # clients that vanish without FIN or RST are reaped
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: stream, client)
        except (OSError, ValueError) as exc:
            log.debug("port %d: client gone before it was joined: %s", binding.service.port, exc)
            stream.abort()
            close_with_reset(client)


class PublicConnection(StreamObserver):
    """Accounting for one public connection (or UDP flow), counted in here and counted out in
    `closed`: bytes, the agent's stream counters, the port's connections per source."""

    __slots__ = ("_binding", "_bytes", "_observer", "_service", "_source", "_state", "_stream")

    def __init__(
        self,
        observer: RelayObserver,
        binding: PortBinding,
        state: AgentState,
        stream: MuxStream | DatagramFlow,
        source: Any,
    ) -> None:
        self._observer = observer
        self._binding = binding
        self._state = state
        self._stream = stream
        self._source = source
        self._service = binding.service.name
        self._bytes = observer.stream_opened(state.name, self._service)
        state.streams_total += 1
        binding.connections += 1
        binding.streams.add(stream)
        binding.by_source[source] = binding.by_source.get(source, 0) + 1

    def sent(self, n: int) -> None:
        self._state.bytes_to_agent += n
        self._bytes.to_agent += n

    def received(self, n: int) -> None:
        self._state.bytes_from_agent += n
        self._bytes.from_agent += n

    def closed(self, ok: bool) -> None:
        binding = self._binding
        binding.connections -= 1
        binding.streams.discard(self._stream)
        left = binding.by_source[self._source] - 1
        if left:
            binding.by_source[self._source] = left
        else:
            del binding.by_source[self._source]
        self._observer.stream_closed(self._state.name, self._service)
