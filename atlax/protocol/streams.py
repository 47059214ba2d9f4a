"""The connection's table of live streams and the id rules (docs/protocol.md, "Roles and stream
ids"): each side's ids only grow, so an id at or below the last one opened, and no longer live,
belongs to a stream that is over, however long ago it ended. No set of old ids is kept."""

from __future__ import annotations

import enum

from .errors import ErrorCode, RemoteProtocolError
from .flow import ReceiveWindow, SendWindow
from .frames import MAX_STREAM_ID

# A peer that keeps opening streams we must refuse (beyond MAX_STREAMS) is flooding.
MAX_REFUSED_STREAMS = 1000


class Role(enum.Enum):
    CLIENT = "client"  # dialled the connection (the agent): odd stream ids
    SERVER = "server"  # accepted it (the relay): even stream ids


class StreamRecord:
    """The connection's side of one stream: credit both ways and which halves are closed."""

    __slots__ = ("local_closed", "recv", "remote_closed", "send", "stream_id")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.stream_id = stream_id
        self.send = SendWindow(send_window)
        self.recv = ReceiveWindow(recv_window)
        self.local_closed = False  # we sent FIN
        self.remote_closed = False  # peer sent FIN


class StreamTable:
    __slots__ = (
        "_client",
        "_refused",
        "last_peer_id",
        "live",
        "local_open",
        "next_local_id",
        "peer_open",
    )

    def __init__(self, role: Role) -> None:
        client = role is Role.CLIENT
        self._client = client  # the client's ids are odd, the server's even
        self._refused = 0
        self.live: dict[int, StreamRecord] = {}
        self.next_local_id = 1 if client else 2
        self.last_peer_id = 0
        self.local_open = 0  # live streams this side opened
        self.peer_open = 0  # live streams the peer opened

    def is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self._client

    @property
    def ids_left(self) -> bool:
        return self.next_local_id <= MAX_STREAM_ID

    def open_local(self, send_window: int, recv_window: int) -> int:
        stream_id = self.next_local_id
        self.next_local_id += 2
        self.live[stream_id] = StreamRecord(stream_id, send_window, recv_window)
        self.local_open += 1
        return stream_id

    def check_peer_id(self, stream_id: int) -> None:
        """The peer may open `stream_id` (its parity, above its last); records it as used."""
        if self.is_local(stream_id):
            raise RemoteProtocolError(f"OPEN for stream {stream_id}, which has this side's parity")
        if stream_id <= self.last_peer_id:
            raise RemoteProtocolError(f"OPEN for stream {stream_id}, not above {self.last_peer_id}")
        self.last_peer_id = stream_id

    def open_peer(self, stream_id: int, send_window: int, recv_window: int) -> StreamRecord:
        record = self.live[stream_id] = StreamRecord(stream_id, send_window, recv_window)
        self.peer_open += 1
        return record

    def for_frame(self, stream_id: int, frame_name: str) -> StreamRecord | None:
        """The live stream a frame is for; None for a stream that is over (the frame is
        ignored: a side cannot know which of its frames crossed a RESET); else an error."""
        record = self.live.get(stream_id)
        if record is not None:
            return record
        opened = (
            stream_id < self.next_local_id
            if self.is_local(stream_id)
            else stream_id <= self.last_peer_id
        )
        if not opened:
            raise RemoteProtocolError(f"{frame_name} for stream {stream_id}, never opened")
        return None

    def refuse(self) -> None:
        """Count a stream refused for MAX_STREAMS; too many is a flood."""
        self._refused += 1
        if self._refused > MAX_REFUSED_STREAMS:
            raise RemoteProtocolError(
                f"peer opened more than {MAX_REFUSED_STREAMS} streams beyond MAX_STREAMS",
                ErrorCode.ENHANCE_YOUR_CALM,
            )

    def local_above(self, last_id: int) -> list[int]:
        return [s for s in self.live if self.is_local(s) and s > last_id]

    def forget(self, stream_id: int) -> bool:
        """Drop a stream; False if it was not live."""
        if self.live.pop(stream_id, None) is None:
            return False
        if self.is_local(stream_id):
            self.local_open -= 1
        else:
            self.peer_open -= 1
        return True
