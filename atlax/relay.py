"""The relay: accepts agents over mutual TLS and maps public TCP ports to their services.

The set of agents and ports is declarative: `apply_agent` makes an agent's public ports exactly
what its spec says (all or nothing), `remove_agent` closes them and revokes the identity. The
config file and the control socket both go through these two calls.
"""

from __future__ import annotations

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
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSAttribute, TLSStream

from .config import AgentSpec, RelaySettings, ServiceSpec
from .metrics import MetricsServer, RateLimitedLog, RelayMetrics
from .mux import MuxSession, TunnelClosedError
from .pipe import abort_socket, pipe
from .protocol import (
    ALPN,
    Connection,
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
    listeners: list[anyio.abc.SocketListener]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    connections: int = 0
    by_source: dict[Any, int] = field(default_factory=dict)  # open connections per client IP


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
        self._listeners: list[anyio.abc.SocketListener] = []
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
        self._listeners = await _listen(s.listen.host, s.listen.port)
        self.listen_addresses = [_address(lst) for lst in self._listeners]
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for spec in self._initial:
                    await self.apply_agent(spec)
                if s.metrics is not None:
                    metrics_listeners = await _listen(s.metrics.host, s.metrics.port)
                    server = MetricsServer(self.metrics, self.readiness)
                    await tg.start(server.serve, metrics_listeners)
                    log.info("metrics and health on %s", _fmt(_address(metrics_listeners[0])))
                if s.control_socket is not None:
                    from .control import ControlServer

                    self.control = ControlServer(self, s.control_socket)
                    await tg.start(self.control.serve)
                addresses = ", ".join(_fmt(a) for a in self.listen_addresses)
                log.info("relay listening for agents on %s", addresses)
                for lst in self._listeners:
                    tg.start_soon(accept_loop, lst, self._handle_agent)
                tg.start_soon(self._watch_tls_files)
                self.ready.set()
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for lst in self._listeners:
                    await lst.aclose()

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

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY to every agent, stop accepting, let open streams finish within `grace`."""
        if self._shutting_down:
            return
        self._shutting_down = True
        grace = self.settings.drain_timeout if grace is None else grace
        log.info("relay shutting down: draining streams for up to %gs", grace)
        for lst in self._listeners:
            await lst.aclose()
        for binding in self._ports.values():
            for lst in binding.listeners:
                await lst.aclose()  # no new clients; open ones keep running
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
            bound: dict[int, list[anyio.abc.SocketListener]] = {}
            try:
                for port in sorted(p for p in wanted if p not in self._ports):
                    bound[port] = await self._bind(port)
            except PortConflictError:
                for listeners in bound.values():
                    for lst in listeners:
                        await lst.aclose()
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

    async def _bind(self, port: int) -> list[anyio.abc.SocketListener]:
        host = self.settings.public_host
        try:
            return await _listen(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise PortConflictError(port, f"cannot listen on {host}:{port}: {reason}") from None

    def _open_port(
        self, port: int, agent: str, service: ServiceSpec, listeners: list[anyio.abc.SocketListener]
    ) -> None:
        assert self._tg is not None
        binding = PortBinding(agent, service, listeners)
        self._ports[port] = binding
        self._tg.start_soon(self._serve_port, binding)

    async def _close_port(self, port: int) -> None:
        """Stop listening before returning, and drop the port's open connections."""
        binding = self._ports.pop(port)
        binding.scope.cancel()
        for lst in binding.listeners:
            await lst.aclose()

    async def _serve_port(self, binding: PortBinding) -> None:
        async def handle(client: anyio.abc.SocketStream) -> None:
            await self._handle_client(binding, client)

        try:
            with binding.scope:
                async with anyio.create_task_group() as tg:
                    for lst in binding.listeners:
                        tg.start_soon(accept_loop, lst, handle)
        finally:
            with anyio.CancelScope(shield=True):
                for lst in binding.listeners:
                    await lst.aclose()

    # -- public clients ----------------------------------------------------------------------

    async def _handle_client(self, binding: PortBinding, client: anyio.abc.SocketStream) -> None:
        async with client:
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
                abort_socket(client)
                return
            state = self._agents[binding.agent]
            session = state.session
            assert session is not None
            try:
                proxy = 2 if service.proxy_protocol == "v2" else None
                stream = await session.open_stream(service.name, origin, proxy)
            except TunnelClosedError:
                return
            state.streams_total += 1
            binding.connections += 1
            source = origin.source if origin is not None else None
            binding.by_source[source] = binding.by_source.get(source, 0) + 1
            _keepalive(client)
            m = self.metrics
            m.streams_total.labels(state.name, service.name).inc()
            m.streams_open.labels(state.name).inc()
            to_agent = m.bytes_total.labels(state.name, service.name, "to_agent")
            from_agent = m.bytes_total.labels(state.name, service.name, "from_agent")
            ok = False
            try:

                def count_to_agent(n: int) -> None:
                    state.bytes_to_agent += n
                    to_agent.inc(n)

                def count_from_agent(n: int) -> None:
                    state.bytes_from_agent += n
                    from_agent.inc(n)

                ok = await pipe(client, stream, a_to_b=count_to_agent, b_to_a=count_from_agent)
            finally:
                binding.connections -= 1
                left = binding.by_source[source] - 1
                if left:
                    binding.by_source[source] = left
                else:
                    del binding.by_source[source]
                m.streams_open.labels(state.name).dec()
                if not ok:
                    abort_socket(client)
                await stream.aclose()

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

    async def _handle_agent(self, tcp: anyio.abc.SocketStream) -> None:
        peer = _fmt(tcp.extra(SocketAttribute.remote_address))
        assert self._ssl is not None
        try:
            with anyio.fail_after(self.settings.handshake_timeout):
                tls = await TLSStream.wrap(
                    tcp, server_side=True, ssl_context=self._ssl, standard_compatible=False
                )
        except TimeoutError:
            self.metrics.handshake_failures.labels("timeout").inc()
            log.warning("agent port: TLS handshake from %s timed out", peer)
            await tcp.aclose()
            return
        except (
            ssl.SSLError,
            BrokenResourceError,
            EndOfStream,
            ClosedResourceError,
            OSError,
        ) as exc:
            self.metrics.handshake_failures.labels(_tls_failure_kind(exc)).inc()
            log.warning("agent port: TLS handshake from %s failed: %s", peer, _tls_reason(exc))
            await tcp.aclose()
            return
        name = peer_common_name(tls.extra(TLSAttribute.peer_certificate))
        if tls.extra(TLSAttribute.alpn_protocol) != ALPN:
            self.metrics.handshake_failures.labels("alpn").inc()
            log.warning("agent port: %s (%s) did not negotiate ALPN %s; closing", peer, name, ALPN)
            await tls.aclose()
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
            await _refuse(tls, code, reason)
            return
        await self._run_agent(state, tls, peer)

    async def _run_agent(self, state: AgentState, tls: TLSStream, peer: str) -> None:
        s = self.settings
        session = MuxSession(
            tls,
            Role.SERVER,
            settings=TUNNEL_SETTINGS,
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            name=f"agent {state.name!r}",
        )
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


async def _listen(host: str, port: int) -> list[anyio.abc.SocketListener]:
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    return [lst for lst in multi.listeners if isinstance(lst, anyio.abc.SocketListener)]


def _address(listener: anyio.abc.SocketListener) -> tuple[str, int]:
    address = listener.extra(SocketAttribute.local_address)
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


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


async def _refuse(tls: TLSStream, code: ErrorCode, reason: str) -> None:
    conn = Connection(Role.SERVER)
    conn.close(code, reason)
    with anyio.move_on_after(2):
        try:
            await tls.send(conn.data_to_send())
        except (BrokenResourceError, ClosedResourceError, OSError):
            pass
    await tls.aclose()


def _origin(client: anyio.abc.SocketStream) -> Origin | None:
    try:
        src = client.extra(SocketAttribute.remote_address)
        dst = client.extra(SocketAttribute.local_address)
        src_ip = ipaddress.ip_address(src[0])
        dst_ip = ipaddress.ip_address(dst[0])
        if src_ip.version != dst_ip.version:
            return None
        return Origin(src_ip, int(src[1]), dst_ip, int(dst[1]))
    except (ValueError, TypeError, IndexError, anyio.TypedAttributeLookupError):
        return None


_REFUSALS = {
    "source_denied": "source address not in the port's allow list",
    "agent_offline": "its agent is offline",
    "port_limit": "the port is at its max_connections limit",
    "agent_limit": "the agent is at its max_streams limit",
    "source_limit": "that source address is at max_connections_per_source on this port",
}


def _keepalive(client: anyio.abc.SocketStream) -> None:
    """TCP keepalive on public connections: clients that vanish without FIN/RST are reaped."""
    try:
        sock = client.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError, anyio.TypedAttributeLookupError):
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
    if isinstance(exc, EndOfStream):
        return "connection closed during the handshake"
    return str(exc) or type(exc).__name__
