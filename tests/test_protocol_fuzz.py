"""Property tests: whatever bytes arrive, the core answers with events or its own typed error."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

from atlax.protocol import (
    Connection,
    ConnectionState,
    EndReason,
    Origin,
    RemoteProtocolError,
    Role,
    Settings,
    names,
)
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import (
    FrameType,
    decode_open_payload,
    encode_frame,
    encode_open_payload,
    encode_settings,
)

# Examples kept in the repo (read-only here: test runs never modify the tree).
CORPUS = ReadOnlyDatabase(
    DirectoryBasedExampleDatabase(str(Path(__file__).parent / "corpus" / "frames"))
)

FRAME = st.builds(
    lambda t, f, s, p: encode_frame(t, f, s, p),  # type: ignore[arg-type]
    st.integers(0, 7),
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 4, 6, 2**31 - 1]),
    st.binary(max_size=64),
)


def _feed(conn: Connection, chunks: list[bytes]) -> None:
    """Feed until the core raises its typed error; then it must be closed, with GOAWAY carrying
    the error's code queued and the reason recorded. Otherwise it is still up."""
    conn.data_to_send()
    try:
        for chunk in chunks:
            conn.receive_data(chunk, now=0.0)
    except RemoteProtocolError as exc:
        assert conn.state is ConnectionState.CLOSED
        assert conn.end is not None and conn.end.reason is EndReason.PROTOCOL_ERROR
        assert conn.end.code == exc.error_code
        goaway = [
            f for f in FrameDecoder(1 << 24).feed(conn.data_to_send()) if f.type is FrameType.GOAWAY
        ]
        assert len(goaway) == 1 and int.from_bytes(goaway[0].payload[4:8], "big") == exc.error_code
        assert conn.receive_data(b"anything after", now=0.0) == []
    else:
        assert conn.state is not ConnectionState.CLOSED or conn.end is not None


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], database=CORPUS)
@given(st.lists(st.binary(max_size=256), max_size=8), st.sampled_from(list(Role)))
def test_arbitrary_bytes_give_only_protocol_errors(chunks: list[bytes], role: Role) -> None:
    _feed(Connection(role), chunks)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], database=CORPUS)
@given(st.lists(FRAME, max_size=12), st.sampled_from(list(Role)))
def test_arbitrary_frames_after_a_valid_start(frames: list[bytes], role: Role) -> None:
    """Well-formed headers with random content reach the state machine, not just the decoder."""
    start = encode_settings(Settings())
    _feed(Connection(role), [start, *frames])


@given(st.binary(max_size=64))
def test_open_payload_decoder(payload: bytes) -> None:
    try:
        decode_open_payload(payload)
    except RemoteProtocolError:
        pass


@given(st.lists(FRAME, max_size=10), st.data())
def test_split_points_do_not_change_frames(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole, split = [], []
    try:
        whole = list(FrameDecoder(1 << 20).feed(stream))
    except RemoteProtocolError:
        return
    decoder = FrameDecoder(1 << 20)
    for piece in pieces:
        split += list(decoder.feed(piece))
    assert split == whole


# DATA frames around the decoder's direct-read threshold and its scratch size.
BIG_DATA = st.builds(
    lambda s, n, fill: encode_frame(0, 0, s, bytes([fill]) * n),  # type: ignore[arg-type]
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 4095, 4096, 4097, 16_371, 16_372, 16_384, 40_000]),
    st.integers(0, 255),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(FRAME, BIG_DATA), max_size=8), st.data())
def test_reads_into_the_decoders_buffers_give_the_same_frames(
    frames: list[bytes], data: st.DataObject
) -> None:
    """The BufferedProtocol-style path (read into `get_buffer()`, any amount) equals `feed`,
    and a frame's payload is never overwritten by what is read after it."""
    stream = b"".join(frames)
    try:
        whole = [
            (f.type, f.flags, f.stream_id, bytes(f.payload))
            for f in FrameDecoder(1 << 20).feed(stream)
        ]
    except RemoteProtocolError:
        return
    decoder = FrameDecoder(1 << 20)
    got = []
    pos = 0
    while pos < len(stream):
        buffer = decoder.get_buffer()
        assert len(buffer) > 0
        n = min(len(buffer), len(stream) - pos, data.draw(st.integers(1, 50_000)))
        buffer[:n] = stream[pos : pos + n]
        pos += n
        got += list(decoder.buffer_updated(n))
    assert [(f.type, f.flags, f.stream_id, bytes(f.payload)) for f in got] == whole
    assert decoder.buffered == 0


ADDRESS_V4 = st.ip_addresses(v=4)
PORT = st.integers(0, 65535)


SERVICE = st.from_regex(names.SERVICE_PATTERN, fullmatch=True).filter(names.is_service_name)


@given(SERVICE, ADDRESS_V4, PORT, ADDRESS_V4, PORT)
def test_open_round_trips(
    name: str,
    src: ipaddress.IPv4Address,
    sport: int,
    dst: ipaddress.IPv4Address,
    dport: int,
) -> None:
    origin = Origin(src, sport, dst, dport)
    decoded = decode_open_payload(encode_open_payload(name, origin, 2))
    assert (decoded.service, decoded.origin, decoded.proxy_protocol) == (name, origin, 2)
