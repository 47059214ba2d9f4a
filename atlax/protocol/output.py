"""How the frames a connection queued become writes."""

from __future__ import annotations

from collections.abc import Sequence

from .frames import Flag, FrameType, encode_header

# Payloads this large are written as they are rather than joined with their neighbours.
SEPARATE_WRITE = 16_384


def coalesce(items: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """Small frames joined into one item (one TLS record, one syscall), large payloads left as
    they are: views of the data given to `send_data`, never copied here."""
    if len(items) <= 1:
        return list(items)
    chunks: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for item in items:
        if len(item) >= SEPARATE_WRITE:
            if run:
                chunks.append(b"".join(run))
                run = []
            chunks.append(item)
        else:
            run.append(item)
    if run:
        chunks.append(b"".join(run))
    return chunks


def split_data(
    out: list[bytes | memoryview],
    stream_id: int,
    data: bytes | memoryview,
    end_stream: bool,
    step: int,
) -> None:
    """Queue `data` as DATA frames of at most `step` bytes: a header, then a view of the payload
    (not copied). FIN on the last one, or on an empty frame for empty `data`."""
    view = memoryview(data)
    length = len(view)
    for offset in range(0, length, step):
        chunk = view[offset : offset + step]
        flags = Flag.FIN if end_stream and offset + step >= length else 0
        out.append(encode_header(FrameType.DATA, flags, stream_id, len(chunk)))
        out.append(chunk)
    if end_stream and length == 0:
        out.append(encode_header(FrameType.DATA, Flag.FIN, stream_id, 0))
