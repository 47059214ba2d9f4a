"""The relay: agents dial in over mutual TLS, public ports are joined to their streams.

registry.py   agents, public ports and the services that share them, apply/remove, snapshots
ports.py      public TCP ports: accept, hold, join a client to a stream
policy.py     the refusal and eviction policy: who is refused or evicted, and why
routing.py    ports shared by hostname: read the ClientHello or Host, pick the service
udp.py        public UDP ports: a flow per client address, over a datagram stream
admission.py  the agent port: handshake, identity check, replacement
server.py     `Relay`: serve, TLS reload, shutdown
instance.py   who this relay process is among the instances serving the same addresses
observer.py   what the relay reports (the metrics implement it)
"""

from .admission import TUNNEL_SETTINGS, HandshakeFailure
from .instance import Instance, new_instance_id
from .observer import ByteCounter, RelayObserver
from .policy import Eviction, Refusal
from .registry import AgentRegistry, PortConflictError, PortNotPermittedError
from .server import Relay
from .udp import DatagramDrop

__all__ = [
    "TUNNEL_SETTINGS",
    "AgentRegistry",
    "ByteCounter",
    "DatagramDrop",
    "Eviction",
    "HandshakeFailure",
    "Instance",
    "PortConflictError",
    "PortNotPermittedError",
    "Refusal",
    "Relay",
    "RelayObserver",
    "new_instance_id",
]
