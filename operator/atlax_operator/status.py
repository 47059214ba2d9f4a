"""One TunnelAgent's live state across every relay pod, from the pods' reports. Pure: no I/O.

A relay pod counts when its report is fresh and says it is ready (reachable, its desired state
applied). The agent's ports are open when every ready relay opened them; it is connected when it
holds a tunnel to every instance of every ready relay (`Partial` when to some).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .reports import AgentReport, RelayReport, ServiceKey


class PortsReason(StrEnum):
    """The PortsOpen condition's reason (and its events')."""

    OPEN = "Open"
    PENDING = "Pending"  # some ready relays have not opened them yet
    PORT_CONFLICT = "PortConflict"
    PORT_NOT_PERMITTED = "PortNotPermitted"  # below 1024 without the chart's sysctl
    SERVICE_NOT_FOUND = "ServiceNotFound"
    RELAY_UNAVAILABLE = "RelayUnavailable"  # no relay is ready: starting or restarting
    REJECTED = "Rejected"


class ConnectedReason(StrEnum):
    """The Connected condition's reason."""

    TUNNEL_UP = "TunnelUp"  # a tunnel to every ready relay instance
    PARTIAL = "Partial"  # to some of them
    TUNNEL_DOWN = "TunnelDown"


@dataclass(frozen=True)
class PortsResult:
    reason: PortsReason
    message: str
    address: str | None = None  # the Service's load-balancer address, once the ports are open

    @property
    def open(self) -> bool:
        return self.reason is PortsReason.OPEN


@dataclass(frozen=True)
class LiveAgent:
    ports: PortsResult  # what the relays did with the agent's ports
    relay_instances: int  # instances of the ready relays
    connected_instances: int  # of those, the ones holding a tunnel of the agent
    reason: ConnectedReason
    message: str
    bytes_in: int = 0
    bytes_out: int = 0
    active_streams: int = 0
    last_seen: str | None = None

    @property
    def connected(self) -> bool:
        return self.reason is ConnectedReason.TUNNEL_UP

    @property
    def tunnels(self) -> str:
        """For the CONNECTED column: `2/3`."""
        return f"{self.connected_instances}/{self.relay_instances}"


def service_keys(services: Iterable[Mapping[str, Any]]) -> tuple[ServiceKey, ...]:
    """What a service list (a spec's or a relay's, same keys) asks of the relay, sorted: two
    lists ask the same when their keys are equal."""
    return tuple(
        sorted(
            (
                str(s["name"]),
                int(s["port"]),
                str(s.get("protocol") or "tcp"),
                str(s.get("route") or ""),
                tuple(sorted(str(h) for h in s.get("hostnames") or ())),
            )
            for s in services
        )
    )


def ports_text(ports: Sequence[ServiceKey]) -> str:
    return ",".join(
        f"{name}:{port}" + ("/udp" if protocol == "udp" else "")
        for name, port, protocol, _, _ in ports
    )


def live_agent(name: str, ports: Sequence[ServiceKey], reports: Sequence[RelayReport]) -> LiveAgent:
    """Aggregate the fresh `reports` for agent `name`, whose spec asks for `ports`."""
    ready = [r for r in reports if r.ready]
    text = ports_text(ports)
    if not ready:
        errors = sorted({r.error for r in reports if r.error})
        why = f"relay not reachable: {'; '.join(errors)}" if errors else "no relay is ready yet"
        return LiveAgent(
            PortsResult(PortsReason.RELAY_UNAVAILABLE, why),
            0,
            0,
            ConnectedReason.TUNNEL_DOWN,
            why,
        )
    held = [(r, r.agents[name]) for r in ready if name in r.agents]
    relay_instances = sum(r.instances for r in ready)
    connected = sum(min(a.tunnels, r.instances) for r, a in held)
    if connected and connected == relay_instances:
        peers = sorted({a.peer for _, a in held if a.peer})
        reason = ConnectedReason.TUNNEL_UP
        message = (
            f"tunnel up from {peers[0]}"
            if relay_instances == 1 and peers
            else f"tunnels to all {relay_instances} relay instances"
        )
    elif connected:
        reason = ConnectedReason.PARTIAL
        message = f"tunnels to {connected} of {relay_instances} relay instances"
    else:
        reason, message = ConnectedReason.TUNNEL_DOWN, "the agent is not connected"
    heartbeats = [a.last_heartbeat for _, a in held if a.last_heartbeat]
    return LiveAgent(
        _ports(ports, text, ready, held),
        relay_instances,
        connected,
        reason,
        message,
        bytes_in=sum(a.bytes_in for _, a in held),
        bytes_out=sum(a.bytes_out for _, a in held),
        active_streams=sum(a.active_streams for _, a in held),
        last_seen=max(heartbeats) if heartbeats else None,
    )


def _ports(
    ports: Sequence[ServiceKey],
    text: str,
    ready: list[RelayReport],
    held: list[tuple[RelayReport, AgentReport]],
) -> PortsResult:
    for r, a in held:
        if a.refused:
            where = "the relay" if len(ready) == 1 else f"relay {r.pod}"
            reason = PortsReason(a.refused)
            return PortsResult(reason, a.message if len(ready) == 1 else f"{where}: {a.message}")
    wanted = set(ports)
    done = sum(1 for _, a in held if set(a.ports) == wanted)
    if done == len(ready):
        where = "the relay" if done == 1 else f"all {done} relays"
        return PortsResult(PortsReason.OPEN, f"ports {text} open on {where}")
    if len(ready) == 1:
        return PortsResult(PortsReason.PENDING, f"waiting for the relay to open ports {text}")
    return PortsResult(PortsReason.PENDING, f"ports {text} open on {done} of {len(ready)} relays")
