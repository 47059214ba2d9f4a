"""The agent: keeps a tunnel to every relay instance and forwards streams to local services.

pool.py      `Agent`: which tunnels to keep and when to dial (the decisions are policy.py's)
policy.py    the pool's decisions without I/O: target, duplicates, dial pace, staleness
tunnel.py    one tunnel: dial, TLS, the relay's SETTINGS, JOIN or close as a duplicate
services.py  a stream to its local service (and the PROXY protocol header)
"""

from .policy import RESTART_BACKOFF_CAP
from .pool import Agent
from .services import proxy_v2_header
from .tunnel import TUNNEL_SETTINGS

__all__ = ["RESTART_BACKOFF_CAP", "TUNNEL_SETTINGS", "Agent", "proxy_v2_header"]
