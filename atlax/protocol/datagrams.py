"""Datagram streams (UDP flows): datagram records in a stream's bytes, and a sender that drops.

docs/protocol.md, "Datagram streams": each datagram is a record of a u16 length and the datagram;
records may span DATA frames. A sender sends a record only when the stream's credit covers all of
it; what cannot be sent waits in a short queue, and what does not fit the queue is dropped. Pure
like the rest of the core: the shell feeds received bytes to a `DatagramDecoder` and passes the
stream's credit to `DatagramQueue.take`.
"""

from __future__ import annotations

from collections import deque

from .errors import RemoteProtocolError

RECORD_HEADER = 2
MAX_DATAGRAM = 0xFFFF
DEFAULT_QUEUE = 32  # datagrams a flow holds while its credit is short (docs/protocol.md)


def encode_datagram(datagram: bytes | bytearray | memoryview) -> bytes:
    """The record for one datagram; ValueError if it is larger than a record can carry."""
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(datagram)} bytes is larger than {MAX_DATAGRAM}")
    return len(datagram).to_bytes(RECORD_HEADER, "big") + datagram


class DatagramDecoder:
    """Splits the bytes received on a datagram stream into datagrams, whatever the framing."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of a record not yet complete (at most 2 + 65535)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The datagrams completed by `data`, in order. What is kept of a record not yet
        complete is at most 2 + 65535 bytes, so a receiver may give back the credit for all of
        `data` once it has handed these datagrams on (or dropped them)."""
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        pos = 0
        while len(buffer) - pos >= RECORD_HEADER:
            end = pos + RECORD_HEADER + int.from_bytes(buffer[pos : pos + RECORD_HEADER], "big")
            if end > len(buffer):
                break
            datagrams.append(bytes(buffer[pos + RECORD_HEADER : end]))
            pos = end
        del buffer[:pos]
        return datagrams

    def end(self) -> None:
        """The stream's FIN arrived: a record cut short makes the stream malformed."""
        if self._buffer:
            raise RemoteProtocolError(
                f"datagram stream ended inside a record ({len(self._buffer)} bytes of it)"
            )


class DatagramQueue:
    """The datagrams a flow sends, held while its credit is short: at most `limit`, then dropped.

    `push` a datagram as it arrives, then `take(credit)` the records to send now: whole records,
    in order, as many as the credit covers. The newest datagram is the one dropped, so the order
    of those kept never changes.
    """

    __slots__ = ("_queue", "dropped", "limit", "max_record")

    def __init__(self, max_record: int, limit: int = DEFAULT_QUEUE) -> None:
        """`max_record` is the peer's INITIAL_WINDOW: a larger record could never be sent."""
        if limit < 1:
            raise ValueError("a datagram queue holds at least one datagram")
        self.limit = limit
        self.max_record = min(max_record, RECORD_HEADER + MAX_DATAGRAM)
        self._queue: deque[bytes] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, datagram: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram; False (and counted in `dropped`) when the queue is full or the
        datagram's record is larger than `max_record`."""
        if len(self._queue) >= self.limit or RECORD_HEADER + len(datagram) > self.max_record:
            self.dropped += 1
            return False
        self._queue.append(encode_datagram(datagram))
        return True

    def take(self, credit: int) -> bytes:
        """The records to send now: whole ones from the front while `credit` covers them."""
        queue = self._queue
        taken: list[bytes] = []
        while queue and len(queue[0]) <= credit:
            record = queue.popleft()
            credit -= len(record)
            taken.append(record)
        return b"".join(taken)

    def clear(self) -> None:
        """The flow ended: what is queued is dropped (and counted)."""
        self.dropped += len(self._queue)
        self._queue.clear()
