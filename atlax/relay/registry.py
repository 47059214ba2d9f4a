"""The relay's registry: which agents it serves, which public ports belong to whom, what is live.

The set of agents and ports is declarative: `apply_agent` makes an agent's public ports exactly
what its spec says (all or nothing), `remove_agent` closes them and revokes the identity. The
config file and the control socket both go through these two calls; `agents()` and `agent()`
are the snapshots the control API answers with.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..config import AgentSpec, ServiceSpec
from ..isotime import iso_utc
from ..logs import describe
from ..mux import MuxSession, MuxStream
from ..net import close_listener, listen_sockets
from ..protocol import ErrorCode

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
        return {
            "name": self.name,
            "connected": connected,
            "since": iso_utc(since) if connected and since is not None else None,
            "lastHeartbeat": heartbeat,
            "peer": self.peer if connected else None,
            "activeStreams": session.active_streams if session is not None else 0,
            "streamsTotal": self.streams_total,
            "bytesIn": self.bytes_from_agent,
            "bytesOut": self.bytes_to_agent,
            "rttSeconds": rtt,
            "services": [{"name": s.name, "port": s.port} for s in self.spec.services],
        }


@dataclass(eq=False)
class PortBinding:
    """One public port of one agent's service, its listening sockets and open connections."""

    state: AgentState
    service: ServiceSpec
    listeners: list[socket.socket]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    streams: set[MuxStream] = field(default_factory=set)
    connections: int = 0
    by_source: dict[Any, int] = field(default_factory=dict)  # open connections per client IP

    @property
    def agent(self) -> str:
        return self.state.name

    def stop_listening(self) -> None:
        """No new clients; open ones keep running."""
        for sock in self.listeners:
            close_listener(sock)

    def close(self) -> None:
        """Stop listening and drop the port's open connections."""
        self.scope.cancel()
        self.stop_listening()
        for stream in list(self.streams):
            stream.abort()


class AgentRegistry:
    """Agents and their port bindings. `serve_port` starts accepting on a new binding."""

    def __init__(self, public_host: str, serve_port: Callable[[PortBinding], None]) -> None:
        self.public_host = public_host
        self._serve_port = serve_port
        self._agents: dict[str, AgentState] = {}
        self._ports: dict[int, PortBinding] = {}
        self._apply_lock = anyio.Lock()

    # -- reading -----------------------------------------------------------------------------

    def agents(self) -> list[dict[str, Any]]:
        """Snapshots of every configured agent, by name."""
        return [a.snapshot() for a in sorted(self._agents.values(), key=lambda a: a.name)]

    def agent(self, name: str) -> dict[str, Any] | None:
        """The snapshot of one agent, or None if it is not configured."""
        state = self._agents.get(name)
        return None if state is None else state.snapshot()

    def port_owner(self, port: int) -> str | None:
        """The agent whose service listens on public `port`, if any."""
        binding = self._ports.get(port)
        return None if binding is None else binding.agent

    def get(self, name: str) -> AgentState | None:
        """The live entry of one agent (its tunnel is `.session`)."""
        return self._agents.get(name)

    def binding(self, port: int) -> PortBinding | None:
        """The binding of public `port` (its open `connections`, per source `by_source`)."""
        return self._ports.get(port)

    def connected(self) -> int:
        """Agents with a tunnel now."""
        return sum(1 for a in self._agents.values() if a.session is not None)

    def sessions(self) -> list[MuxSession]:
        """Every live tunnel."""
        return [a.session for a in self._agents.values() if a.session is not None]

    def bindings(self) -> list[PortBinding]:
        return list(self._ports.values())

    def bytes_moved(self) -> int:
        """Payload bytes through every agent since the start, both ways."""
        return sum(a.bytes_to_agent + a.bytes_from_agent for a in self._agents.values())

    # -- changing ----------------------------------------------------------------------------

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
                if binding.state is state and port not in wanted:
                    del self._ports[port]
                    binding.close()
            for port, service in wanted.items():
                if port in bound:
                    binding = self._ports[port] = PortBinding(state, service, bound[port])
                    self._serve_port(binding)
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
                if binding.state is state:
                    del self._ports[port]
                    binding.close()
            if state.session is not None:
                state.session.close(ErrorCode.UNAUTHORIZED, f"agent {name!r} was removed")
            log.info("agent %r removed: ports closed, identity revoked", name)
            return True

    async def _bind(self, port: int) -> list[socket.socket]:
        host = self.public_host
        try:
            return await listen_sockets(host, port)
        except PermissionError:
            raise PortNotPermittedError(
                port,
                f"cannot listen on {host}:{port}: permission denied; ports below "
                f"{_unprivileged_port_start()} need the sysctl "
                "net.ipv4.ip_unprivileged_port_start at or below the port, or "
                "CAP_NET_BIND_SERVICE (Helm: relay.allowPrivilegedPorts=true)",
            ) from None
        except OSError as exc:
            reason = describe(exc)
            raise PortConflictError(port, f"cannot listen on {host}:{port}: {reason}") from None


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024
