"""The I/O shell around the protocol core: `MuxSession` (one tunnel, session.py), `MuxStream`
(one TCP connection, stream.py) and `ReadScheduler` (who may read, scheduler.py)."""

from .scheduler import READ_CREDIT, RECENT_PAUSES, ReadScheduler
from .session import TUNNEL_HIGH_WATER, MuxSession, StreamHandler, TunnelClosedError
from .stream import MuxStream, StreamObserver, StreamState

__all__ = [
    "READ_CREDIT",
    "RECENT_PAUSES",
    "TUNNEL_HIGH_WATER",
    "MuxSession",
    "MuxStream",
    "ReadScheduler",
    "StreamHandler",
    "StreamObserver",
    "StreamState",
    "TunnelClosedError",
]
