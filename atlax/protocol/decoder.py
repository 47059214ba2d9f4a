"""The incremental frame decoder: a byte stream in, `Frame`s out, zero-copy for large payloads.

It checks only what one frame alone can violate (reserved bits, sizes, which frames live on
stream 0); the frame layout and payload codecs are `frames.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

from .errors import ErrorCode, RemoteProtocolError
from .frames import (
    EXTENSION_FRAMES,
    HEADER,
    HEADER_SIZE,
    MAX_STREAM_ID,
    MIN_MAX_FRAME_SIZE,
    Frame,
    FrameType,
)

_CONNECTION_FRAMES = frozenset({FrameType.PING, FrameType.GOAWAY, FrameType.SETTINGS})
_FIXED_SIZES = {FrameType.WINDOW_UPDATE: 4, FrameType.RESET: 4, FrameType.PING: 8}
_TYPES = {int(t): t for t in FrameType}  # a dict lookup: calling the enum costs ~1 µs a frame

# A payload at least this long is read straight into a buffer of its own, so a large DATA frame
# is never copied between the transport and the application; shorter frames are cut out of a
# small scratch buffer that must hold one such frame plus a header.
DIRECT_PAYLOAD = 4096
SCRATCH_SIZE = 16_384


class FrameDecoder:
    """Splits a byte stream into frames, checking what one frame alone can violate.

    Two ways to feed it: `feed(data)` with bytes read elsewhere, or, like asyncio's
    `BufferedProtocol`, `get_buffer()` then `buffer_updated(n)` once `n` bytes were written into
    that buffer. The second lets a transport (TLS) decrypt a large payload into the very
    `bytearray` that the resulting frame carries. A payload buffer is never reused, so a caller
    may hand it on (to a socket's write buffer) and keep it as long as it likes.
    """

    def __init__(self, max_frame_size: int = MIN_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._scratch = bytearray(SCRATCH_SIZE)
        self._view = memoryview(self._scratch)
        self._start = 0  # unparsed bytes are _scratch[_start:_end]
        self._end = 0
        self._header: tuple[FrameType, int, int] | None = None  # of the payload being read
        self._payload = bytearray()
        self._filled = 0

    @property
    def buffered(self) -> int:
        return self._end - self._start + self._filled

    def get_buffer(self) -> memoryview:
        """Where the next bytes go: never empty, and never past the end of a large payload."""
        if self._header is not None:
            return memoryview(self._payload)[self._filled :]
        if self._start:
            n = self._end - self._start  # < HEADER_SIZE + DIRECT_PAYLOAD: a cheap move
            self._scratch[:n] = bytes(self._view[self._start : self._end])
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """`nbytes` were written at the start of the last `get_buffer()`: the complete frames.

        Raises RemoteProtocolError on the first invalid header; bytes after it are never read.
        """
        header = self._header
        if header is None:
            self._end += nbytes
            return self._parse()
        self._filled += nbytes
        if self._filled < len(self._payload):
            return []
        payload, self._payload, self._header, self._filled = self._payload, bytearray(), None, 0
        return [Frame(header[0], header[1], header[2], payload)]

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Yield every complete frame in the buffered bytes plus `data` (copied in once)."""
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            buffer = self.get_buffer()
            n = min(len(buffer), end - pos)
            buffer[:n] = view[pos : pos + n]
            pos += n
            yield from self.buffer_updated(n)

    def _parse(self) -> list[Frame]:
        buf, view = self._scratch, self._view
        pos, end = self._start, self._end
        frames: list[Frame] = []
        try:
            while end - pos >= HEADER_SIZE:
                stream_id, length, raw_type, flags, reserved = HEADER.unpack_from(buf, pos)
                if (
                    raw_type == 0  # DATA, the common case: its checks without a call
                    and 0 < stream_id <= MAX_STREAM_ID
                    and not reserved
                    and length <= self.max_frame_size
                ):
                    type_ = FrameType.DATA
                else:
                    type_ = self._check_header(stream_id, length, raw_type, reserved)
                start = pos + HEADER_SIZE
                if length >= DIRECT_PAYLOAD:
                    have = min(end - start, length)
                    payload = bytearray(length)
                    payload[:have] = view[start : start + have]
                    pos = start + have
                    if have == length:
                        frames.append(Frame(type_, flags, stream_id, payload))
                        continue
                    self._header = (type_, flags, stream_id)
                    self._payload, self._filled = payload, have
                    break
                if end - start < length:
                    break
                pos = start + length
                frames.append(Frame(type_, flags, stream_id, bytes(view[start:pos])))
        finally:
            if pos == end:
                self._start = self._end = 0
            else:
                self._start = pos
        return frames

    def _check_header(self, stream_id: int, length: int, raw_type: int, reserved: int) -> FrameType:
        if stream_id > MAX_STREAM_ID or reserved:
            raise RemoteProtocolError("frame header has reserved bits set")
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds MAX_FRAME_SIZE {self.max_frame_size}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        type_ = _TYPES.get(raw_type)
        if type_ is None:
            raise RemoteProtocolError(f"unknown frame type 0x{raw_type:x}")
        if type_ in EXTENSION_FRAMES:
            return type_  # whether it exists here at all depends on SETTINGS: the connection's
        if (type_ in _CONNECTION_FRAMES) != (stream_id == 0):
            where = "stream 0" if stream_id == 0 else f"stream {stream_id}"
            raise RemoteProtocolError(f"{type_.name} frame is not allowed on {where}")
        fixed = _FIXED_SIZES.get(type_)
        if fixed is not None and length != fixed:
            raise RemoteProtocolError(
                f"{type_.name} payload must be {fixed} bytes, got {length}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if type_ is FrameType.GOAWAY and length < 8:
            raise RemoteProtocolError(
                "GOAWAY payload is shorter than 8 bytes", ErrorCode.FRAME_SIZE_ERROR
            )
        if type_ is FrameType.SETTINGS and length % 6:
            raise RemoteProtocolError(
                "SETTINGS payload is not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR
            )
        return type_
