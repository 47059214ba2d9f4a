"""The relay: agents dial in over mutual TLS, public TCP ports are joined to their streams.

registry.py   agents, port bindings, apply/remove, snapshots
ports.py      public ports: accept, the refusal policy, join a client to a stream
admission.py  the agent port: handshake, identity check, replacement
server.py     `Relay`: serve, TLS reload, shutdown
observer.py   what the relay reports (the metrics implement it)
"""

from .admission import TUNNEL_SETTINGS, HandshakeFailure
from .observer import ByteCounter, RelayObserver
from .ports import Refusal
from .registry import AgentRegistry, PortConflictError, PortNotPermittedError
from .server import Relay

__all__ = [
    "TUNNEL_SETTINGS",
    "AgentRegistry",
    "ByteCounter",
    "HandshakeFailure",
    "PortConflictError",
    "PortNotPermittedError",
    "Refusal",
    "Relay",
    "RelayObserver",
]
