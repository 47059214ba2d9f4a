"""The relay's registry: which agents it serves, which public ports belong to whom, what is live.

The set of agents and ports is declarative: `apply_agent` makes an agent's public ports exactly
what its spec says (all or nothing), `remove_agent` closes them and revokes the identity. The
config file and the control socket both go through these two calls; `agents()` and `agent()`
are the snapshots the control API answers with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..config import AgentSpec, PortKey, ServiceSpec
from ..idle import IdleClock, IdleOrder
from ..isotime import iso_utc
from ..logs import describe
from ..mux import MuxSession
from ..net import close_listener, listen_sockets
from ..protocol import ErrorCode
from ..sniff import HostnameTable

log = logging.getLogger("atlax.relay")


class PortConflictError(Exception):
    """A public port cannot be opened; nothing was changed."""

    def __init__(self, port: int, reason: str) -> None:
        super().__init__(reason)
        self.port = port


class PortNotPermittedError(PortConflictError):
    """The relay may not listen on this port (below net.ipv4.ip_unprivileged_port_start)."""


@dataclass(eq=False)
class AgentState:
    """What the relay knows of one configured agent (the registry entry)."""

    spec: AgentSpec
    # Its open public connections, least recently active first (the registry's clock).
    idle: IdleOrder[Any] = field(default_factory=lambda: IdleOrder(IdleClock()))
    instance: str = ""  # the relay instance's id, as the control API shows it
    session: MuxSession | None = None  # the joined tunnel: new streams go here
    # Every live tunnel of this agent (the current one, any still draining or not yet joined):
    # its key pin.
    tunnels: dict[MuxSession, str | None] = field(default_factory=dict)
    peer: str | None = None
    connected_since: float | None = None  # wall clock
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    streams_total: int = 0
    _tunnel_moved: anyio.Event | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def tunnel_moved(self) -> None:
        """A tunnel joined or left, or a port closed: wake whoever waits (held clients)."""
        if self._tunnel_moved is not None:
            self._tunnel_moved.set()
            self._tunnel_moved = None

    async def next_move(self) -> None:
        """Until the next `tunnel_moved()`."""
        if self._tunnel_moved is None:
            self._tunnel_moved = anyio.Event()
        await self._tunnel_moved.wait()

    @property
    def usable(self) -> bool:
        """The agent has a tunnel here that can carry a new stream."""
        return self.session is not None and self.session.can_open_stream

    def snapshot(self) -> dict[str, Any]:
        """The agent's live state as the control API shows it."""
        session = self.session
        connected = session is not None and session.ready
        heartbeat: str | None = None
        rtt: float | None = None
        if session is not None and connected:
            age = session.clock() - session.last_received
            heartbeat = iso_utc(time.time() - age)
            rtt = session.rtt
        since = self.connected_since
        since_text = iso_utc(since) if connected and since is not None else None
        instances = []
        if connected and session is not None:
            instances.append(
                {
                    "instance": self.instance,
                    "connected": True,
                    "since": since_text,
                    "peer": self.peer,
                    "activeStreams": session.active_streams,
                }
            )
        return {
            "name": self.name,
            "connected": connected,
            "since": since_text,
            "lastHeartbeat": heartbeat,
            "peer": self.peer if connected else None,
            "activeStreams": session.active_streams if session is not None else 0,
            "streamsTotal": self.streams_total,
            "bytesIn": self.bytes_from_agent,
            "bytesOut": self.bytes_to_agent,
            "rttSeconds": rtt,
            "services": [_service_snapshot(s) for s in self.spec.services],
            "pins": list(self.spec.pins),
            "pin": self.tunnels.get(session) if session is not None and connected else None,
            "instances": instances,  # one per relay instance holding a tunnel of this agent
        }

    def unpinned(self, pin: str | None) -> str | None:
        """Why a tunnel with key `pin` may not serve this agent, or None if it may."""
        if not self.spec.pins or pin in self.spec.pins:
            return None
        if pin is None:
            return f"agent {self.name!r}: the key of its certificate cannot be read"
        return f"agent {self.name!r} presented key {pin}, which is not pinned for it"


def _service_snapshot(service: ServiceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": service.name, "port": service.port}
    if service.protocol != "tcp":
        out["protocol"] = service.protocol
    if service.route is not None:
        out["route"] = service.route
        out["hostnames"] = list(service.hostnames)
    return out


@dataclass(eq=False)
class PortBinding:
    """One agent's service on a public port, and the connections (or UDP flows) it has open."""

    state: AgentState
    service: ServiceSpec
    # Its open connections (PublicConnection), least recently active first.
    idle: IdleOrder[Any] = field(default_factory=lambda: IdleOrder(IdleClock()))
    connections: int = 0
    by_source: dict[Any, int] = field(default_factory=dict)  # open connections per client IP
    closed: bool = False

    @property
    def agent(self) -> str:
        return self.state.name

    def close(self) -> None:
        """Drop the service's open connections."""
        self.closed = True
        self.state.tunnel_moved()  # clients held for the agent on this service give up
        for connection in self.idle:
            connection.abort()


@dataclass(eq=False)
class PublicPort:
    """A public TCP or UDP port, its sockets, and the services it serves: one, or several that
    share it by hostname (`route`), each hostname to one service (docs/routing.md)."""

    key: PortKey
    listeners: list[socket.socket]
    bindings: list[PortBinding] = field(default_factory=list)
    hostnames: HostnameTable[PortBinding] = field(default_factory=HostnameTable)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    sniffing: int = 0  # connections of a shared port still being read (routing.py)
    sniffing_by_source: dict[Any, int] = field(default_factory=dict)
    transports: list[asyncio.BaseTransport] = field(default_factory=list)  # a UDP port's (udp.py)

    @property
    def route(self) -> str | None:
        """The route of a port shared by hostname, "tls" or "http" (every binding says the
        same); None for a port of one service's own."""
        return self.bindings[0].service.route if self.bindings else None

    @property
    def text(self) -> str:
        """How messages name the port: "443" for TCP, "53/udp" for UDP."""
        return str(self.key.port) if self.key.protocol == "tcp" else str(self.key)

    def lookup(self, hostname: str) -> PortBinding | None:
        """The service for `hostname` on a shared port: exact name, then longest wildcard."""
        return self.hostnames.lookup(hostname)

    def conflict(self, agent: str, services: list[ServiceSpec]) -> str | None:
        """Why `agent` cannot put `services` on this port beside the other agents here."""
        others = [b for b in self.bindings if b.agent != agent]
        if not others:
            return None
        owner = others[0]
        if owner.service.route is None or any(s.route is None for s in services):
            return f"port {self.text} is already used by agent {owner.agent!r}"
        for service in services:
            if service.route != owner.service.route:
                return (
                    f"port {self.text} routes by {owner.service.route!r} (agent "
                    f"{owner.agent!r}), not {service.route!r}"
                )
            for hostname in service.hostnames:
                holder = self.hostnames.get(hostname)
                if holder is not None and holder.agent != agent:
                    return (
                        f"hostname {hostname!r} on port {self.text} is already used by agent "
                        f"{holder.agent!r}"
                    )
        return None

    def assign(self, state: AgentState, services: list[ServiceSpec]) -> None:
        """Make `services` the agent's bindings here; a binding of the same service name keeps
        its open connections and counters."""
        kept = {b.service.name: b for b in self.bindings if b.state is state}
        self.release(state, keep={s.name for s in services})
        for service in services:
            binding = kept.get(service.name)
            if binding is None:
                binding = PortBinding(state, service, IdleOrder(state.idle.clock))
                self.bindings.append(binding)
            binding.service = service
            for hostname in service.hostnames:
                self.hostnames.add(hostname, binding)

    def release(self, state: AgentState, keep: Collection[str] = ()) -> None:
        """Remove the agent's bindings (but those named in `keep`, whose hostnames go too)."""
        for binding in [b for b in self.bindings if b.state is state]:
            for hostname in binding.service.hostnames:
                self.hostnames.remove(hostname)
            if binding.service.name not in keep:
                self.bindings.remove(binding)
                binding.close()

    def stop_listening(self) -> None:
        """No new clients; open ones keep running. A UDP port's sockets belong to their
        transports once served: closing a transport closes its socket."""
        if self.transports:
            for transport in self.transports:
                transport.close()
            return
        for sock in self.listeners:
            close_listener(sock)

    def close(self) -> None:
        """Stop listening and drop the port's open connections."""
        self.scope.cancel()
        self.stop_listening()
        for binding in self.bindings:
            binding.close()


class AgentRegistry:
    """Agents and their public ports. `serve_port` starts serving a newly opened port."""

    def __init__(
        self,
        public_host: str,
        serve_port: Callable[[PublicPort], None],
        clock: IdleClock | None = None,
        *,
        instance: str = "",
        reuse_port: bool = False,
    ) -> None:
        self.public_host = public_host
        self.clock = clock or IdleClock()  # of the idle orders; the relay advances it
        self.instance = instance
        self.reuse_port = reuse_port  # workers of one relay share every public port
        self._serve_port = serve_port
        self._agents: dict[str, AgentState] = {}
        self._ports: dict[PortKey, PublicPort] = {}
        self._apply_lock = anyio.Lock()

    # -- reading -----------------------------------------------------------------------------

    def agents(self) -> list[dict[str, Any]]:
        """Snapshots of every configured agent, by name."""
        return [a.snapshot() for a in sorted(self._agents.values(), key=lambda a: a.name)]

    def agent(self, name: str) -> dict[str, Any] | None:
        """The snapshot of one agent, or None if it is not configured."""
        state = self._agents.get(name)
        return None if state is None else state.snapshot()

    def port_owner(self, port: int, protocol: str = "tcp") -> str | None:
        """The agent whose service has public `port` to itself, if any."""
        public = self._ports.get(PortKey(port, protocol))
        if public is None or public.route is not None:
            return None
        return public.bindings[0].agent

    def get(self, name: str) -> AgentState | None:
        """The live entry of one agent (its tunnel is `.session`)."""
        return self._agents.get(name)

    def binding(self, port: int, protocol: str = "tcp") -> PortBinding | None:
        """The binding of a public port that one service has to itself (its open
        `connections`, per source `by_source`)."""
        public = self._ports.get(PortKey(port, protocol))
        if public is None or public.route is not None:
            return None
        return public.bindings[0]

    def port(self, port: int, protocol: str = "tcp") -> PublicPort | None:
        return self._ports.get(PortKey(port, protocol))

    def connected(self) -> int:
        """Agents with a tunnel now."""
        return sum(1 for a in self._agents.values() if a.session is not None)

    def sessions(self) -> list[MuxSession]:
        """Every live tunnel."""
        return [a.session for a in self._agents.values() if a.session is not None]

    def ports(self) -> list[PublicPort]:
        return list(self._ports.values())

    def bytes_moved(self) -> int:
        """Payload bytes through every agent since the start, both ways."""
        return sum(a.bytes_to_agent + a.bytes_from_agent for a in self._agents.values())

    # -- changing ----------------------------------------------------------------------------

    async def apply_agent(self, spec: AgentSpec) -> bool:
        """Make `spec` the agent's desired state: all ports open or none. True if it changed."""
        async with self._apply_lock:
            wanted: dict[PortKey, list[ServiceSpec]] = {}
            for service in spec.services:
                wanted.setdefault(service.key, []).append(service)
            for key in sorted(wanted):
                public = self._ports.get(key)
                reason = None if public is None else public.conflict(spec.name, wanted[key])
                if reason is not None:
                    raise PortConflictError(key.port, reason)
            bound: dict[PortKey, list[socket.socket]] = {}
            try:
                for key in sorted(k for k in wanted if k not in self._ports):
                    bound[key] = await self._bind(key)
            except PortConflictError:
                for listeners in bound.values():
                    for sock in listeners:
                        close_listener(sock)
                raise
            state = self._agents.get(spec.name)
            changed = state is None or state.spec != spec
            ports = ", ".join(str(k) for k in sorted(wanted))
            if state is None:
                state = self._agents[spec.name] = AgentState(
                    spec, IdleOrder(self.clock), instance=self.instance
                )
                log.info("agent %r configured with ports %s", spec.name, ports)
            elif changed:
                log.info("agent %r updated: ports %s", spec.name, ports)
            state.spec = spec
            for session, pin in list(state.tunnels.items()):
                reason = state.unpinned(pin)
                if reason is not None:  # the key was revoked: its tunnels go now
                    log.warning(
                        "agent %r: key %s is no longer pinned: closing its tunnel", spec.name, pin
                    )
                    session.close(ErrorCode.UNAUTHORIZED, reason)
            for key, public in list(self._ports.items()):
                if key not in wanted:
                    self._release(public, state)
            for key, services in wanted.items():
                public = self._ports.get(key)
                if public is None:
                    public = self._ports[key] = PublicPort(key, bound[key])
                    public.assign(state, services)
                    self._serve_port(public)
                else:
                    public.assign(state, services)
            return changed

    async def remove_agent(self, name: str) -> bool:
        """Close the agent's ports, drop its tunnel and refuse its identity from now on."""
        async with self._apply_lock:
            state = self._agents.pop(name, None)
            if state is None:
                return False
            for public in list(self._ports.values()):
                self._release(public, state)
            if state.session is not None:
                state.session.close(ErrorCode.UNAUTHORIZED, f"agent {name!r} was removed")
            state.tunnel_moved()
            log.info("agent %r removed: ports closed, identity revoked", name)
            return True

    def _release(self, public: PublicPort, state: AgentState) -> None:
        """Take the agent off a port; a port nobody uses any more is closed."""
        public.release(state)
        if not public.bindings:
            del self._ports[public.key]
            public.close()

    async def _bind(self, key: PortKey) -> list[socket.socket]:
        host = self.public_host
        try:
            # A TCP port is bound (it is ours: conflicts show now) but listens only once the
            # ports room says so: an instance of several listens when the agent has joined it.
            return await listen_sockets(
                host,
                key.port,
                udp=key.protocol == "udp",
                reuse_port=self.reuse_port,
                listen=False,
            )
        except PermissionError:
            raise PortNotPermittedError(
                key.port,
                f"cannot listen on {host}:{key.port}: permission denied; ports below "
                f"{_unprivileged_port_start()} need the sysctl "
                "net.ipv4.ip_unprivileged_port_start at or below the port, or "
                "CAP_NET_BIND_SERVICE (Helm: relay.allowPrivilegedPorts=true)",
            ) from None
        except OSError as exc:  # its text names the address
            raise PortConflictError(key.port, describe(exc)) from None


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024
