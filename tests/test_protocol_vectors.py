"""The test vectors printed in docs/protocol.md, read from that file so spec and code agree."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from atlax.protocol import Connection, ErrorCode, Origin, RemoteProtocolError, Role, Settings
from atlax.protocol.frames import (
    FrameDecoder,
    FrameType,
    encode_frame,
    encode_goaway_payload,
    encode_open_payload,
    encode_settings,
    encode_u32,
)

SPEC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _block(name: str) -> list[list[str]]:
    text = SPEC.read_text()
    match = re.search(rf"```{name}\n(.*?)```", text, re.S)
    assert match, f"no ```{name} block in {SPEC}"
    return [line.split() for line in match.group(1).splitlines() if line.strip()]


VECTORS = {row[0]: bytes.fromhex("".join(row[1:])) for row in _block("vectors")}
INVALID = {
    row[0]: (bytes.fromhex("".join(row[1:-1])), row[-1]) for row in _block("invalid-vectors")
}

ORIGIN = Origin(ipaddress.ip_address("203.0.113.7"), 54321, ipaddress.ip_address("127.0.0.1"), 8080)

EXPECTED = {
    "settings-defaults": encode_settings(Settings()),
    "ping": encode_frame(FrameType.PING, 0, 0, bytes(range(1, 9))),
    "pong": encode_frame(FrameType.PING, 2, 0, bytes(range(1, 9))),
    "open-web": encode_frame(FrameType.OPEN, 0, 2, encode_open_payload("web")),
    "open-web-origin": encode_frame(FrameType.OPEN, 0, 2, encode_open_payload("web", ORIGIN)),
    "open-web-proxy-v2": encode_frame(FrameType.OPEN, 0, 2, encode_open_payload("web", ORIGIN, 2)),
    "data-hello": encode_frame(FrameType.DATA, 0, 2, b"hello"),
    "data-fin-empty": encode_frame(FrameType.DATA, 1, 2, b""),
    "window-update-65536": encode_frame(FrameType.WINDOW_UPDATE, 0, 2, encode_u32(65536)),
    "reset-connect-failed": encode_frame(
        FrameType.RESET, 0, 2, encode_u32(ErrorCode.CONNECT_FAILED)
    ),
    "goaway-no-error": encode_frame(FrameType.GOAWAY, 0, 0, encode_goaway_payload(2, 0, "bye")),
}


def test_every_vector_is_checked() -> None:
    assert set(VECTORS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encoding_matches_spec(name: str) -> None:
    assert EXPECTED[name] == VECTORS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decoding_round_trips(name: str) -> None:
    frames = list(FrameDecoder().feed(VECTORS[name]))
    assert len(frames) == 1
    frame = frames[0]
    assert encode_frame(frame.type, frame.flags, frame.stream_id, frame.payload) == VECTORS[name]


def _client_with_stream() -> Connection:
    """A client connection that has the server's SETTINGS and server stream 2 open."""
    conn = Connection(Role.CLIENT)
    conn.receive_data(VECTORS["settings-defaults"] + VECTORS["open-web"], now=0.0)
    return conn


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_vectors_raise_the_spec_error(name: str) -> None:
    data, code = INVALID[name]
    conn = _client_with_stream()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(data, now=0.0)
    assert info.value.error_code is ErrorCode[code]
    # The connection answered with GOAWAY carrying the same code.
    sent = list(FrameDecoder(1 << 24).feed(conn.data_to_send()))
    goaway = [f for f in sent if f.type is FrameType.GOAWAY]
    assert goaway and int.from_bytes(goaway[-1].payload[4:8], "big") == ErrorCode[code]


def test_open_with_origin_decodes() -> None:
    conn = Connection(Role.CLIENT)
    events = conn.receive_data(VECTORS["settings-defaults"] + VECTORS["open-web-origin"], now=0.0)
    opened = events[-1]
    assert getattr(opened, "service", None) == "web"
    assert getattr(opened, "origin", None) == ORIGIN
