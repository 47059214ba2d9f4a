"""The refusal and eviction policy for public connections: who is closed at once, and why.

`refusal` says whether a newcomer must be refused whatever room there is; `limits` lists the
connection limits (port, agent, relay) it counts toward; `make_room` evicts the connection idle
the longest in each full scope, or names the limit that cannot make room. `Refusal` and
`Eviction` values are the `atlax_connections_refused_total` and
`atlax_connections_evicted_total` labels. Pure decisions: the accepting is in `ports.py`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from ..config import RelaySettings
from ..idle import IdleOrder
from ..protocol import Origin
from .registry import PortBinding

# A connection must have been idle this many ticks of the idle clock (seconds; >= 1 s once the
# tick it last moved in is over) before it is closed to make room for a newcomer.
EVICT_AFTER_IDLE_TICKS = 2


class Eviction(StrEnum):
    """Why a public connection was closed to make room; the values are the metric labels."""

    IDLE = "idle"  # no byte either way for the longest in a full port, agent or relay
    BUFFER_BUDGET = "buffer_budget"  # its client took no byte for the longest, over the budget


class Refusal(StrEnum):
    """Why a public connection is closed at once. The value is the metric label, `text` the
    reason the log line gives. Checked in this order: the first that applies is the reason."""

    SOURCE_DENIED = "source_denied", "source address not in the port's allow list"
    AGENT_OFFLINE = "agent_offline", "its agent is offline"
    SOURCE_LIMIT = (
        "source_limit",
        "that source address is at max_connections_per_source on this port",
    )
    # These three refuse only when no connection in their scope has been idle a moment.
    PORT_LIMIT = "port_limit", "the port is at its max_connections limit"
    AGENT_LIMIT = "agent_limit", "the agent is at its max_streams limit"
    RELAY_LIMIT = "relay_limit", "the relay is at its max_public_connections limit"
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
    """Why a new public connection on `binding` must be closed at once whatever room there is,
    or None (then `make_room` applies the connection limits)."""
    service = binding.service
    if service.allow and (
        origin is None or not any(_contains(net, origin.source) for net in service.allow)
    ):
        return Refusal.SOURCE_DENIED
    session = binding.state.session
    if session is None or not session.can_open_stream:
        return Refusal.AGENT_OFFLINE
    per_source = settings.max_connections_per_source
    if origin is not None and binding.by_source.get(origin.source, 0) >= per_source:
        return Refusal.SOURCE_LIMIT  # that source is the one filling the port: no eviction
    return None


Limit = tuple[IdleOrder[Any], int, Refusal]


def limits(binding: PortBinding, settings: RelaySettings, everyone: IdleOrder[Any]) -> list[Limit]:
    """The connection limits a newcomer on `binding` counts toward, narrowest scope first."""
    port = binding.service.max_connections or settings.max_connections_per_port
    agent = binding.state.spec.max_streams or settings.max_streams_per_agent
    return [
        (binding.idle, port, Refusal.PORT_LIMIT),
        (binding.state.idle, agent, Refusal.AGENT_LIMIT),
        (everyone, settings.max_public_connections, Refusal.RELAY_LIMIT),
    ]


def make_room(scopes: list[Limit], evict: Callable[[Any, int, Refusal], None]) -> Refusal | None:
    """For each full scope, `evict` its connection idle the longest (at least
    EVICT_AFTER_IDLE_TICKS); the limit that cannot be made room in, or None."""
    for order, limit, reason in scopes:
        while len(order) >= limit:
            found = order.idlest(EVICT_AFTER_IDLE_TICKS)
            if found is None:
                return reason
            evict(*found, reason)
    return None


def _contains(network: ipaddress.IPv4Network | ipaddress.IPv6Network, address: Any) -> bool:
    if network.version != address.version:
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d from a dual-stack socket
        return mapped is not None and mapped in network
    return bool(address in network)
