"""The test vectors printed in docs/protocol.md, read from that file so spec and code agree."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from atlax.protocol import (
    Connection,
    DataReceived,
    ErrorCode,
    LocalProtocolError,
    Origin,
    RemoteProtocolError,
    Role,
    Settings,
    StreamOpened,
)
from atlax.protocol.datagrams import DatagramDecoder, encode_datagram
from atlax.protocol.decoder import FrameDecoder
from atlax.protocol.frames import (
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
DNS_ORIGIN = Origin(
    ipaddress.ip_address("203.0.113.7"), 54321, ipaddress.ip_address("127.0.0.1"), 5353
)

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
    "settings-datagrams": encode_settings(Settings(datagrams=True)),
    "open-dns-datagram": encode_frame(
        FrameType.OPEN, 0, 2, encode_open_payload("dns", DNS_ORIGIN, datagram=True)
    ),
    "data-two-datagrams": encode_frame(
        FrameType.DATA, 0, 2, encode_datagram(b"ping") + encode_datagram(b"")
    ),
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
    """A client connection (accepting datagram streams) that has the server's SETTINGS and
    server stream 2 open."""
    conn = Connection(Role.CLIENT, Settings(datagrams=True))
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


def test_open_datagram_decodes() -> None:
    conn = Connection(Role.CLIENT, Settings(datagrams=True))
    events = conn.receive_data(VECTORS["settings-defaults"] + VECTORS["open-dns-datagram"], 0.0)
    assert events[-1] == StreamOpened(2, "dns", DNS_ORIGIN, None, datagram=True)
    data = conn.receive_data(VECTORS["data-two-datagrams"], now=0.0)
    assert data == [DataReceived(2, b"\x00\x04ping\x00\x00")]
    assert DatagramDecoder().feed(data[0].data) == [b"ping", b""]


def test_datagram_streams_need_the_receivers_announcement() -> None:
    """A receiver that did not say DATAGRAMS = 1 refuses one; a sender will not open one."""
    conn = Connection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="DATAGRAMS was not announced"):
        conn.receive_data(VECTORS["settings-defaults"] + VECTORS["open-dns-datagram"], now=0.0)
    server = Connection(Role.SERVER)
    server.receive_data(encode_settings(Settings()), now=0.0)
    with pytest.raises(LocalProtocolError, match="did not announce DATAGRAMS"):
        server.open_stream("dns", datagram=True)
    server = Connection(Role.SERVER)
    server.receive_data(VECTORS["settings-datagrams"], now=0.0)
    assert server.peer_settings == Settings(datagrams=True)
    assert server.open_stream("dns", DNS_ORIGIN, datagram=True) == 2
    assert server.data_to_send().endswith(VECTORS["open-dns-datagram"])


def test_datagrams_setting_out_of_range() -> None:
    conn = Connection(Role.CLIENT)
    bad = encode_frame(FrameType.SETTINGS, 0, 0, bytes.fromhex("0004 00000002"))
    with pytest.raises(RemoteProtocolError, match="DATAGRAMS 2 out of range"):
        conn.receive_data(bad, now=0.0)


def test_settings_without_datagrams_are_what_they_always_were() -> None:
    """An old peer sees the SETTINGS it always saw; it skips an id it does not know."""
    assert encode_settings(Settings()) == VECTORS["settings-defaults"]
    conn = Connection(Role.SERVER)
    conn.receive_data(VECTORS["settings-datagrams"], now=0.0)
    assert conn.peer_settings is not None and conn.peer_settings.initial_window == 262144
