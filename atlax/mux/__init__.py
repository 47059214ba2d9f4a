"""The I/O shell around the protocol core: `MuxSession` (one tunnel, session.py), `MuxStream`
(one TCP connection, stream.py), `DatagramFlow` (one UDP flow, datagram.py) and `ReadScheduler`
(who may read, scheduler.py)."""

from .datagram import DatagramFlow, FlowState
from .scheduler import READ_CREDIT, RECENT_PAUSES, ReadScheduler
from .session import TUNNEL_HIGH_WATER, FlowHandler, MuxSession, StreamHandler, TunnelClosedError
from .stream import MuxStream, StreamObserver, StreamState

__all__ = [
    "READ_CREDIT",
    "RECENT_PAUSES",
    "TUNNEL_HIGH_WATER",
    "DatagramFlow",
    "FlowHandler",
    "FlowState",
    "MuxSession",
    "MuxStream",
    "ReadScheduler",
    "StreamHandler",
    "StreamObserver",
    "StreamState",
    "TunnelClosedError",
]
