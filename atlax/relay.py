"""The relay: accepts agents over mutual TLS and maps public TCP ports to their services.

The set of agents and ports is declarative: `apply_agent` makes an agent's public ports exactly
what its spec says (all or nothing), `remove_agent` closes them and revokes the identity. The
config file and the control socket both go through these two calls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
from anyio import BrokenResourceError, ClosedResourceError
from anyio.abc import SocketListener

from . import heap
from .config import AgentSpec, RelaySettings, ServiceSpec
from .metrics import MetricsServer, RateLimitedLog, RelayMetrics
from .mux import MuxSession, MuxStream, StreamObserver, TunnelClosedError, reset_on_close
from .protocol import (
    ALPN,
    ErrorCode,
    KeepaliveConfig,
    Origin,
    Role,
    Settings,
)
from .tls import TLSConfigError, file_fingerprint, peer_common_name, relay_context

log = logging.getLogger("atlax.relay")

TLS_CHECK_INTERVAL = 30.0
# The relay opens streams and never accepts them from agents: MAX_STREAMS 0.
TUNNEL_SETTINGS = Settings(initial_window=1 << 20, max_frame_size=256 * 1024, max_streams=0)


class PortConflictError(Exception):
    """A public port cannot be opened; nothing was changed."""

    def __init__(self, port: int, reason: str) -> None:
        super().__init__(reason)
        self.port = port


@dataclass
class AgentState:
    """What the relay knows of one configured agent (the registry entry)."""

    spec: AgentSpec
    session: MuxSession | None = None
    peer: str | None = None
    connected_since: float | None = None  # wall clock
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    streams_total: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def snapshot(self) -> dict[str, Any]:
        session = self.session
        connected = session is not None and session.ready
        heartbeat: str | None = None
        rtt: float | None = None
        if session is not None and connected:
            age = time.monotonic() - session.last_received
            heartbeat = _iso(time.time() - age)
            rtt = session.rtt
        return {
            "name": self.name,
            "connected": connected,
            "since": _iso(self.connected_since) if connected else None,
            "lastHeartbeat": heartbeat,
            "peer": self.peer if connected else None,
            "activeStreams": session.active_streams if session is not None else 0,
            "streamsTotal": self.streams_total,
            "bytesIn": self.bytes_from_agent,
            "bytesOut": self.bytes_to_agent,
            "rttSeconds": rtt,
            "services": [{"name": s.name, "port": s.port} for s in self.spec.services],
        }


@dataclass
class PortBinding:
    agent: str
    service: ServiceSpec
    listeners: list[socket.socket]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    streams: set[MuxStream] = field(default_factory=set)
    connections: int = 0
    by_source: dict[Any, int] = field(default_factory=dict)  # open connections per client IP


class _PublicConnection(StreamObserver):
    """Accounting for one public connection, counted in here and counted out in `closed`:
    bytes, stream counters and gauge, the port's connections per source."""

    __slots__ = ("_binding", "_bytes", "_open", "_source", "_state", "_stream")

    def __init__(
        self,
        metrics: RelayMetrics,
        binding: PortBinding,
        state: AgentState,
        stream: MuxStream,
        source: Any,
    ) -> None:
        service = binding.service.name
        self._binding = binding
        self._state = state
        self._stream = stream
        self._source = source
        self._bytes = metrics.byte_counter(state.name, service)
        self._open = metrics.streams_open.labels(state.name)
        self._open.inc()
        metrics.streams_total.labels(state.name, service).inc()
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
        self._open.dec()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        agents: Iterable[AgentSpec] = (),
        *,
        tls_wait: float = 0.0,
        tls_check_interval: float = TLS_CHECK_INTERVAL,
    ) -> None:
        self.settings = settings
        self._initial = tuple(agents)
        self.tls_wait = tls_wait
        self.tls_check_interval = tls_check_interval
        self.metrics = RelayMetrics()
        self.control: Any = None  # the ControlServer, when settings.control_socket is set
        self._refusals = RateLimitedLog(log)
        self._agents: dict[str, AgentState] = {}
        self._ports: dict[int, PortBinding] = {}
        self._apply_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._ssl: ssl.SSLContext | None = None
        self._listeners: list[socket.socket] = []
        self.listen_addresses: list[tuple[str, int]] = []
        self._shutting_down = False
        self.ready = anyio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        await self._wait_for_tls_files()
        self._ssl = relay_context(s.ca, s.cert, s.key)
        self._listeners = await listen_sockets(s.listen.host, s.listen.port)
        self.listen_addresses = [_sock_address(sock) for sock in self._listeners]
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for spec in self._initial:
                    await self.apply_agent(spec)
                if s.metrics is not None:
                    socks = await listen_sockets(s.metrics.host, s.metrics.port)
                    listeners = [await SocketListener.from_socket(sock) for sock in socks]
                    server = MetricsServer(self.metrics, self.readiness)
                    await tg.start(server.serve, listeners)
                    log.info("metrics and health on %s", _fmt(_sock_address(socks[0])))
                if s.control_socket is not None:
                    from .control import ControlServer

                    self.control = ControlServer(self, s.control_socket)
                    await tg.start(self.control.serve)
                addresses = ", ".join(_fmt(a) for a in self.listen_addresses)
                log.info("relay listening for agents on %s", addresses)
                for sock in self._listeners:
                    tg.start_soon(accept_sockets, sock, self._spawn_agent)
                tg.start_soon(self._watch_tls_files)
                tg.start_soon(self._trim_heap_after_bursts)
                self.ready.set()
                task_status.started()
        finally:
            for sock in self._listeners:
                close_listener(sock)

    def readiness(self) -> tuple[bool, str]:
        if self._shutting_down:
            return False, "shutting down"
        if not self.ready.is_set():
            return False, "starting"
        if self.settings.control_socket is not None and self.control is None:
            return False, "control socket not up"
        return True, "listening"

    async def _wait_for_tls_files(self) -> None:
        """In a pod, the operator writes the relay's certificate shortly after start: wait."""
        s = self.settings
        deadline = anyio.current_time() + self.tls_wait
        missing = [p for p in (s.ca, s.cert, s.key) if not p.exists()]
        if missing and self.tls_wait > 0:
            log.info("waiting up to %gs for %s", self.tls_wait, ", ".join(map(str, missing)))
        while missing and anyio.current_time() < deadline:
            await anyio.sleep(0.5)
            missing = [p for p in (s.ca, s.cert, s.key) if not p.exists()]

    async def _watch_tls_files(self) -> None:
        """Reload the certificate and CA when they change on disk (renewal, cert-manager)."""
        s = self.settings
        seen = file_fingerprint(s.ca, s.cert, s.key)
        while True:
            await anyio.sleep(self.tls_check_interval)
            current = file_fingerprint(s.ca, s.cert, s.key)
            if current == seen:
                continue
            try:
                self._ssl = relay_context(s.ca, s.cert, s.key)
            except TLSConfigError as exc:
                log.warning("certificate files changed but cannot be used yet: %s", exc)
                continue
            seen = current
            log.info("reloaded the relay certificate and CA from disk")

    async def _trim_heap_after_bursts(self) -> None:
        trimmer = heap.HeapTrimmer(self._bytes_moved)
        while trimmer.available:
            await anyio.sleep(heap.INTERVAL)
            trimmer.tick()

    def _bytes_moved(self) -> int:
        return sum(a.bytes_to_agent + a.bytes_from_agent for a in self._agents.values())

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY to every agent, stop accepting, let open streams finish within `grace`."""
        if self._shutting_down:
            return
        self._shutting_down = True
        grace = self.settings.drain_timeout if grace is None else grace
        log.info("relay shutting down: draining streams for up to %gs", grace)
        for sock in self._listeners:
            close_listener(sock)
        for binding in self._ports.values():
            for sock in binding.listeners:
                close_listener(sock)  # no new clients; open ones keep running
        sessions = [a.session for a in self._agents.values() if a.session is not None]
        for session in sessions:
            session.close(ErrorCode.NO_ERROR, "relay shutting down")
        with anyio.move_on_after(grace):
            for session in sessions:
                await session.wait_closed()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # -- declarative state -------------------------------------------------------------------

    def agents(self) -> list[dict[str, Any]]:
        return [a.snapshot() for a in sorted(self._agents.values(), key=lambda a: a.name)]

    def agent(self, name: str) -> dict[str, Any] | None:
        state = self._agents.get(name)
        return None if state is None else state.snapshot()

    def port_owner(self, port: int) -> str | None:
        binding = self._ports.get(port)
        return None if binding is None else binding.agent

    async def apply_agent(self, spec: AgentSpec) -> bool:
        """Make `spec` the agent's desired state: all ports open or none. True if it changed."""
        async with self._apply_lock:
            wanted = {s.port: s for s in spec.services}
            for port in sorted(wanted):
                owner = self.port_owner(port)
                if owner is not None and owner != spec.name:
                    raise PortConflictError(port, f"port {port} is already used by agent {owner!r}")
            bound: dict[int, list[socket.socket]] = {}
            try:
                for port in sorted(p for p in wanted if p not in self._ports):
                    bound[port] = await self._bind(port)
            except PortConflictError:
                for listeners in bound.values():
                    for sock in listeners:
                        close_listener(sock)
                raise
            state = self._agents.get(spec.name)
            changed = state is None or state.spec != spec
            if state is None:
                state = self._agents[spec.name] = AgentState(spec)
                log.info("agent %r configured with ports %s", spec.name, sorted(wanted))
            elif changed:
                log.info("agent %r updated: ports %s", spec.name, sorted(wanted))
            state.spec = spec
            for port, binding in list(self._ports.items()):
                if binding.agent == spec.name and port not in wanted:
                    await self._close_port(port)
            for port, service in wanted.items():
                if port in bound:
                    self._open_port(port, spec.name, service, bound[port])
                else:
                    self._ports[port].service = service
            return changed

    async def remove_agent(self, name: str) -> bool:
        """Close the agent's ports, drop its tunnel and refuse its identity from now on."""
        async with self._apply_lock:
            state = self._agents.pop(name, None)
            if state is None:
                return False
            for port, binding in list(self._ports.items()):
                if binding.agent == name:
                    await self._close_port(port)
            if state.session is not None:
                state.session.close(ErrorCode.UNAUTHORIZED, f"agent {name!r} was removed")
            log.info("agent %r removed: ports closed, identity revoked", name)
            return True

    async def _bind(self, port: int) -> list[socket.socket]:
        host = self.settings.public_host
        try:
            return await listen_sockets(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PortConflictError(port, f"cannot listen on {host}:{port}: {reason}") from None

    def _open_port(
        self, port: int, agent: str, service: ServiceSpec, listeners: list[socket.socket]
    ) -> None:
        assert self._tg is not None
        binding = PortBinding(agent, service, listeners)
        self._ports[port] = binding
        self._tg.start_soon(self._serve_port, binding)

    async def _close_port(self, port: int) -> None:
        """Stop listening before returning, and drop the port's open connections."""
        binding = self._ports.pop(port)
        binding.scope.cancel()
        for sock in binding.listeners:
            close_listener(sock)
        for stream in list(binding.streams):
            stream.abort()

    async def _serve_port(self, binding: PortBinding) -> None:
        async def handle(client: socket.socket) -> None:
            await self._handle_client(binding, client)

        try:
            with binding.scope:
                async with anyio.create_task_group() as tg:
                    for sock in binding.listeners:
                        tg.start_soon(accept_sockets, sock, handle)
        finally:
            for sock in binding.listeners:
                close_listener(sock)

    # -- public clients ----------------------------------------------------------------------

    async def _handle_client(self, binding: PortBinding, client: socket.socket) -> None:
        """Join a public connection to a new stream; from then on it lives in callbacks."""
        service = binding.service
        origin = _origin(client)
        reason = self._refusal(binding, origin)
        if reason is not None:
            self.metrics.refused.labels(str(service.port), reason).inc()
            where = f"{origin.source}:{origin.source_port}" if origin else "unknown peer"
            self._refusals.warning(
                f"{service.port}/{reason}",
                "port %d: closed connection from %s: %s",
                service.port,
                where,
                _REFUSALS[reason],
            )
            _close_with_reset(client)
            return
        state = self._agents[binding.agent]
        session = state.session
        assert session is not None
        try:
            proxy = 2 if service.proxy_protocol == "v2" else None
            stream = session.open_stream_now(service.name, origin, proxy)
        except TunnelClosedError:
            client.close()
            return
        source = origin.source if origin is not None else None
        stream.observer = _PublicConnection(self.metrics, binding, state, stream, source)
        _keepalive(client)
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: stream, client)
        except (OSError, ValueError) as exc:
            log.debug("port %d: client gone before it was joined: %s", service.port, exc)
            stream.abort()
            _close_with_reset(client)

    def _refusal(self, binding: PortBinding, origin: Origin | None) -> str | None:
        """Why a new public connection must be closed at once, or None to serve it."""
        service = binding.service
        if service.allow and (
            origin is None or not any(_contains(net, origin.source) for net in service.allow)
        ):
            return "source_denied"
        state = self._agents.get(binding.agent)
        session = state.session if state is not None else None
        if state is None or session is None or not session.can_open_stream:
            return "agent_offline"
        port_limit = service.max_connections or self.settings.max_connections_per_port
        if binding.connections >= port_limit:
            return "port_limit"
        per_source = self.settings.max_connections_per_source
        if origin is not None and binding.by_source.get(origin.source, 0) >= per_source:
            return "source_limit"
        agent_limit = state.spec.max_streams or self.settings.max_streams_per_agent
        if session.active_streams >= agent_limit:
            return "agent_limit"
        return None

    # -- agents ------------------------------------------------------------------------------

    async def _spawn_agent(self, sock: socket.socket) -> None:
        assert self._tg is not None
        self._tg.start_soon(self._handle_agent, sock)

    async def _handle_agent(self, sock: socket.socket) -> None:
        try:
            await self._agent_connection(sock)
        except Exception:
            log.exception("internal error handling an agent connection; closed it")
            sock.close()

    async def _agent_connection(self, sock: socket.socket) -> None:
        peer = _fmt(_peername(sock))
        assert self._ssl is not None
        s = self.settings
        session = MuxSession(
            Role.SERVER,
            settings=TUNNEL_SETTINGS,
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            name=f"agent at {peer}",
        )
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(s.handshake_timeout):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: session,
                    sock,
                    ssl=self._ssl,
                    ssl_handshake_timeout=s.handshake_timeout + 1,
                )
        except TimeoutError:
            self.metrics.handshake_failures.labels("timeout").inc()
            log.warning("agent port: TLS handshake from %s timed out", peer)
            sock.close()
            return
        except (ssl.SSLError, OSError, EOFError, ValueError) as exc:
            self.metrics.handshake_failures.labels(_tls_failure_kind(exc)).inc()
            log.warning("agent port: TLS handshake from %s failed: %s", peer, _tls_reason(exc))
            sock.close()
            return
        tls = transport.get_extra_info("ssl_object")
        name = peer_common_name(tls.getpeercert()) if tls is not None else None
        if tls is None or tls.selected_alpn_protocol() != ALPN:
            self.metrics.handshake_failures.labels("alpn").inc()
            log.warning("agent port: %s (%s) did not negotiate ALPN %s; closing", peer, name, ALPN)
            session.close(ErrorCode.PROTOCOL_ERROR, f"ALPN {ALPN} required")
            await session.run()
            return
        state = self._agents.get(name) if name else None
        connected = sum(1 for a in self._agents.values() if a.session is not None)
        code, kind, reason = ErrorCode.UNAUTHORIZED, "", ""
        if self._shutting_down:
            kind, reason = "shutting_down", "relay shutting down"
        elif state is None:
            kind, reason = "unknown_identity", f"identity {name!r} is not configured"
        elif state.session is None and connected >= self.settings.max_agents:
            code, kind = ErrorCode.ENHANCE_YOUR_CALM, "agent_limit"
            reason = f"relay already serves its limit of {self.settings.max_agents} agents"
        if state is None or kind:
            self.metrics.handshake_failures.labels(kind).inc()
            log.warning("agent port: refused %r from %s: %s", name, peer, reason)
            session.close(code, reason)
            await session.run()
            return
        session.name = f"agent {state.name!r}"
        await self._run_agent(state, session, peer)

    async def _run_agent(self, state: AgentState, session: MuxSession, peer: str) -> None:
        s = self.settings
        agent_label = state.name

        def record_rtt(rtt: float) -> None:
            self.metrics.tunnel_rtt.labels(agent_label).observe(rtt)

        session.on_pong = record_rtt
        old = state.session
        if old is None:
            self.metrics.agents_connected.inc()
        state.session = session
        state.peer = peer
        state.connected_since = time.time()
        if old is not None:
            log.info("agent %r connected from %s, replacing its earlier tunnel", state.name, peer)
            old.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel from the same identity")
            assert self._tg is not None
            self._tg.start_soon(self._expire, old, s.drain_timeout)
        else:
            log.info("agent %r connected from %s", state.name, peer)
        try:
            await session.run()
        finally:
            if state.session is session:
                state.session = None
                self.metrics.agents_connected.dec()
                log.info("agent %r disconnected: %s", state.name, session.error or "closed")

    @staticmethod
    async def _expire(session: MuxSession, grace: float) -> None:
        with anyio.move_on_after(grace):
            await session.wait_closed()
            return
        session.close(ErrorCode.REPLACED, "replaced by a newer tunnel")


async def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for `host` (every address it resolves to) and `port`.

    Port 0 picks a free port for the first address and uses the same one for the others.
    """
    infos = await anyio.getaddrinfo(
        host or None,
        port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG,
    )
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, _, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, socket.SOCK_STREAM, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(65535)  # the kernel caps it at net.core.somaxconn
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def close_listener(sock: socket.socket) -> None:
    """Close a listening socket; a task waiting in `accept_sockets` on it returns."""
    if sock.fileno() != -1:
        anyio.notify_closing(sock)
        sock.close()


def _sock_address(sock: socket.socket) -> tuple[str, int]:
    address = sock.getsockname()
    return str(address[0]), int(address[1])


async def accept_sockets(
    sock: socket.socket, handler: Callable[[socket.socket], Coroutine[Any, Any, None]]
) -> None:
    """Accept raw connections until the socket is closed, handing each to `handler` in turn.

    The handler runs inline (it must not block for long): public connections are joined to
    their stream at once, agents are handed to a task of their own.
    """
    while True:
        try:
            await anyio.wait_readable(sock)
        except (ClosedResourceError, OSError, ValueError):
            return
        for _ in range(1024):  # drain a burst of connections per wake-up
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if sock.fileno() == -1:
                    return
                log.warning("accept failed: %s", exc.strerror or exc)  # EMFILE and friends
                await anyio.sleep(0.1)
                break
            client.setblocking(False)
            try:
                await handler(client)
            except Exception:
                log.exception("internal error handling a connection; closed it")
                client.close()


async def accept_loop(
    listener: anyio.abc.SocketListener,
    handler: Callable[[Any], Coroutine[Any, Any, None]],
) -> None:
    """Accept until the listener is closed; handlers already running are left to finish."""
    async with anyio.create_task_group() as tg:
        while True:
            try:
                client = await listener.accept()
            except (ClosedResourceError, BrokenResourceError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc.strerror or exc)
                await anyio.sleep(0.1)
                continue
            tg.start_soon(_contained, handler, client)


async def _contained(
    handler: Callable[[Any], Coroutine[Any, Any, None]], client: anyio.abc.SocketStream
) -> None:
    """One connection's bug must never take the relay down with it: log it, drop only that."""
    try:
        await handler(client)
    except Exception:
        log.exception("internal error handling a connection; closed it")
        with anyio.CancelScope(shield=True):
            await client.aclose()


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return "unknown peer"


def _origin(client: socket.socket) -> Origin | None:
    try:
        src = client.getpeername()
        dst = client.getsockname()
        src_ip = ipaddress.ip_address(src[0])
        dst_ip = ipaddress.ip_address(dst[0])
        if src_ip.version != dst_ip.version:
            return None
        return Origin(src_ip, int(src[1]), dst_ip, int(dst[1]))
    except (OSError, ValueError, TypeError, IndexError):
        return None


def _close_with_reset(sock: socket.socket) -> None:
    reset_on_close(sock)
    sock.close()


_REFUSALS = {
    "source_denied": "source address not in the port's allow list",
    "agent_offline": "its agent is offline",
    "port_limit": "the port is at its max_connections limit",
    "agent_limit": "the agent is at its max_streams limit",
    "source_limit": "that source address is at max_connections_per_source on this port",
}


def _keepalive(sock: socket.socket) -> None:
    """TCP keepalive on public connections: clients that vanish without FIN/RST are reaped."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError):
        pass


def _contains(network: ipaddress.IPv4Network | ipaddress.IPv6Network, address: Any) -> bool:
    if network.version != address.version:
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d from a dual-stack socket
        return mapped is not None and mapped in network
    return bool(address in network)


def _tls_failure_kind(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate_rejected"
    if isinstance(exc, ssl.SSLError) and "CERTIFICATE" in (exc.reason or "").upper():
        return "no_certificate"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    return "connection_lost"


def _fmt(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, (ConnectionError, EOFError)):  # asyncio: ConnectionResetError(), no text
        return "connection closed during the handshake"
    return str(exc) or type(exc).__name__
