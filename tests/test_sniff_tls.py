"""The ClientHello reader: real clients' bytes (stored and live), any split, any garbage."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from client_hellos import CLIENTS, capture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlax.sniff import NEED_DATA, ClientHello, ClientHelloReader, SniffError, SniffFailure
from atlax.sniff.hostnames import is_ip_literal
from atlax.sniff.tls import DEFAULT_MAX_SIZE, MAX_BODY

STORED = tomllib.loads((Path(__file__).parent / "data" / "client_hellos.toml").read_text())
VECTORS = {
    name: (bytes.fromhex(entry["hex"]), entry["server_name"] or None)
    for name, entry in STORED.items()
}


def read(*chunks: bytes, max_size: int = DEFAULT_MAX_SIZE) -> ClientHello | SniffError | None:
    """What the reader makes of `chunks` fed in turn: a ClientHello, its error, or None (more)."""
    reader = ClientHelloReader(max_size)
    try:
        for chunk in chunks:
            result = reader.feed(chunk)
            if isinstance(result, ClientHello):
                return result
    except SniffError as exc:
        return exc
    return None


def failure(*chunks: bytes, max_size: int = DEFAULT_MAX_SIZE) -> SniffFailure:
    result = read(*chunks, max_size=max_size)
    assert isinstance(result, SniffError), result
    return result.failure


# -- building ClientHellos -----------------------------------------------------------------------


def u8(data: bytes) -> bytes:
    return len(data).to_bytes(1, "big") + data


def u16(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + u16(data)


def server_name(*names: bytes, kind: int = 0) -> bytes:
    return extension(0, u16(b"".join(bytes([kind]) + u16(name) for name in names)))


def hello(
    extensions: bytes | None = None,
    *,
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    version: bytes = b"\x03\x03",
) -> bytes:
    """A ClientHello handshake message (header included)."""
    if extensions is None:
        extensions = server_name(b"nas.example.com")
    body = version + bytes(32) + u8(session_id) + u16(suites) + u8(compression)
    if extensions != b"-":  # "-": no extensions block at all
        body += u16(extensions)
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, size: int = 1 << 14, content_type: int = 22) -> bytes:
    """`message` in TLS records of at most `size` bytes."""
    out = b""
    for pos in range(0, len(message), size):
        fragment = message[pos : pos + size]
        out += bytes([content_type, 3, 1]) + u16(fragment)
    return out


# -- real clients --------------------------------------------------------------------------------


def test_stored_vectors_cover_the_clients() -> None:
    assert set(VECTORS) == {name for name, *_ in CLIENTS}
    assert any(name.startswith("openssl") for name in VECTORS)
    assert any(name.startswith("curl") for name in VECTORS)
    assert any(name.startswith("python") for name in VECTORS)
    fragmented = VECTORS["openssl-fragmented"][0]
    assert fragmented[0] == 22 and int.from_bytes(fragmented[3:5], "big") < len(fragmented) - 5


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_stored_vector_whole_and_byte_by_byte(name: str) -> None:
    data, expected = VECTORS[name]
    assert read(data) == ClientHello(expected)
    assert read(*(data[i : i + 1] for i in range(len(data)))) == ClientHello(expected)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VECTORS)), st.data())
def test_any_split_of_a_real_client_hello(name: str, data: st.DataObject) -> None:
    raw, expected = VECTORS[name]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert read(*chunks) == ClientHello(expected)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_proper_prefix_needs_more(name: str) -> None:
    raw, _ = VECTORS[name]
    reader = ClientHelloReader()
    for i in range(len(raw) - 1):
        assert reader.feed(raw[i : i + 1]) is NEED_DATA
    assert isinstance(reader.feed(raw[-1:]), ClientHello)


def test_bytes_after_the_client_hello_are_not_looked_at_but_kept() -> None:
    """What the relay forwards is every byte read until the answer, unchanged."""
    raw, expected = VECTORS["openssl-fragmented"]
    reader = ClientHelloReader(max_size=len(raw))
    assert reader.feed(raw[:700]) is NEED_DATA
    assert reader.feed(raw[700:] + b"\x17\x03\x03garbage") == ClientHello(expected)
    assert reader.feed(b"anything at all") == ClientHello(expected)
    assert reader.received == raw + b"\x17\x03\x03garbage"


@pytest.mark.parametrize("name", [name for name, *_ in CLIENTS])
def test_live_client(name: str) -> None:
    """The installed clients today (hack/test-deps installs openssl and curl), not only the
    stored bytes: the reader names their SNI."""
    _, expected, _, client = next(c for c in CLIENTS if c[0] == name)
    assert read(capture(client)) == ClientHello(expected)


# -- generated ClientHellos ----------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,20}[a-z0-9])?", fullmatch=True)
NAME = (
    st.lists(LABEL, min_size=2, max_size=5)
    .map(".".join)
    .filter(lambda n: len(n) <= 253 and not is_ip_literal(n))  # an IP is refused (tested below)
)
OTHER_EXTENSION = st.tuples(st.integers(1, 65535), st.binary(max_size=300))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.none() | NAME,
    others=st.lists(OTHER_EXTENSION, max_size=8, unique_by=lambda e: e[0]),
    position=st.integers(0, 8),
    session_id=st.binary(max_size=32),
    suites=st.lists(st.binary(min_size=2, max_size=2), min_size=1, max_size=40).map(b"".join),
    record_size=st.integers(1, 1 << 14),
    upper=st.booleans(),
)
def test_generated_client_hellos(
    name: str | None,
    others: list[tuple[int, bytes]],
    position: int,
    session_id: bytes,
    suites: bytes,
    record_size: int,
    upper: bool,
) -> None:
    blocks = [extension(kind, data) for kind, data in others]
    if name is not None:
        sent = name.upper() if upper else name
        blocks.insert(min(position, len(blocks)), server_name(sent.encode()))
    message = hello(b"".join(blocks), session_id=session_id, suites=suites)
    data = records(message, record_size)
    assert read(data, max_size=len(data)) == ClientHello(name)
    assert isinstance(read(data, max_size=len(data) - 1), SniffError)


# -- anything else -------------------------------------------------------------------------------


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=600), max_size=8), st.integers(9, 2000))
def test_arbitrary_bytes_give_an_answer_or_a_sniff_error(
    chunks: list[bytes], max_size: int
) -> None:
    reader = ClientHelloReader(max_size)
    fed = 0
    try:
        for chunk in chunks:
            fed += len(chunk)
            if reader.feed(chunk) is NEED_DATA:
                assert fed < max_size  # never waits holding more than its bound
    except SniffError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VECTORS)), st.data())
def test_mutated_client_hellos(name: str, data: st.DataObject) -> None:
    """A byte changed anywhere: the same answer on any split, and only typed errors."""
    raw = bytearray(VECTORS[name][0])
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] = data.draw(st.integers(0, 255))
    whole = read(bytes(raw))
    cut = data.draw(st.integers(0, len(raw)))
    split = read(bytes(raw[:cut]), bytes(raw[cut:]))
    if isinstance(whole, SniffError):
        assert isinstance(split, SniffError) and split.failure is whole.failure
    else:
        assert split == whole


def test_garbage_is_refused_at_its_first_byte() -> None:
    assert failure(b"G") is SniffFailure.NOT_TLS
    assert failure(b"\x17\x03\x03\x00\x10") is SniffFailure.NOT_TLS  # application data
    assert failure(b"\x16\x02") is SniffFailure.NOT_TLS  # not version 3.x
    assert failure(b"\x80\x2e\x01\x00\x02") is SniffFailure.NOT_TLS  # an SSLv2 hello


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x16\x03\x01\x00\x00", "empty handshake record"),
        (b"\x16\x03\x01\x40\x01", "more than 2^14"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "type 2, not 1"),
        (records(hello(session_id=bytes(33))), "legacy_session_id of 33"),
        (records(hello(suites=b"\x13\x01\x13")), "odd length"),
        (records(hello(suites=b"")), "cipher_suites of 0"),
        (records(hello(compression=b"")), "legacy_compression_methods of 0"),
        (records(hello(version=b"\x02\x00")), "legacy_version"),
        (records(hello(extension(5, b"") + extension(5, b""))), "extension 5 appears twice"),
        (records(hello(server_name(b"a.example", b"b.example"))), "two host names"),
        (records(hello(server_name(b"127.0.0.1"))), "IP address"),
        (records(hello(server_name("bücher.example".encode()))), "not ASCII"),
        (records(hello(server_name(b"bad..example"))), "label"),
        (records(hello(server_name(b"-bad.example"))), "label"),
        (records(hello(extension(0, u16(b"")))), "server_name list of 0"),
        (records(hello(extension(0, b""))), "server_name list runs past"),
        (records(hello(extension(0, u16(b"\x00" + u16(b""))))), "server name of 0"),
        (records(hello(extension(0, u16(b"\x00\x00\x05ab")))), "server name runs past"),
        (records(hello(server_name(b"a.example") + b"\x00")), "runs past"),
    ],
)
def test_malformed_client_hellos(data: bytes, fragment: str) -> None:
    result = read(data)
    assert isinstance(result, SniffError)
    assert result.failure is SniffFailure.MALFORMED
    assert fragment in str(result)


def test_trailing_bytes_after_the_extensions() -> None:
    message = hello()
    body = message[4:] + b"\x00"
    data = records(b"\x01" + len(body).to_bytes(3, "big") + body)
    result = read(data)
    assert isinstance(result, SniffError) and "after the extensions" in str(result)


def test_what_is_not_an_error() -> None:
    assert read(records(hello(b"-"))) == ClientHello(None)  # TLS 1.2: no extensions at all
    assert read(records(hello(b""))) == ClientHello(None)  # an empty extensions block
    assert read(records(hello(server_name(b"x", kind=7)))) == ClientHello(None)  # unknown type
    assert read(records(hello(server_name(b"Nas.Example.COM.")))) == ClientHello("nas.example.com")
    both = extension(0, u16(b"\x07" + u16(b"?") + b"\x00" + u16(b"a.example")))
    assert read(records(hello(both))) == ClientHello("a.example")


def test_a_record_of_another_type_inside_the_client_hello() -> None:
    data = records(hello(), 20)
    alert = b"\x15\x03\x03\x00\x02\x02\x28"
    result = read(data[:25] + alert + data[25:])
    assert isinstance(result, SniffError) and result.failure is SniffFailure.MALFORMED
    assert "record of type 21" in str(result)


def test_a_huge_client_hello_is_refused_by_its_declared_length() -> None:
    """Refused on its first 9 bytes: the reader never waits for 100 kB it will not take."""
    head = b"\x16\x03\x01\x40\x00" + b"\x01" + (100_000).to_bytes(3, "big")
    assert failure(head) is SniffFailure.TOO_LARGE
    beyond = b"\x16\x03\x01\x40\x00" + b"\x01" + (MAX_BODY + 1).to_bytes(3, "big")
    assert failure(beyond, max_size=1 << 20) is SniffFailure.MALFORMED


def test_the_size_bound_counts_record_headers() -> None:
    """A ClientHello in 1-byte records takes six bytes per byte; the bound is on those."""
    data = records(hello(), 1)
    assert read(data, max_size=len(data)) == ClientHello("nas.example.com")
    assert failure(data, max_size=len(data) - 1) is SniffFailure.TOO_LARGE
    # The same on any split: bytes past the bound are never parsed.
    assert failure(*(data[i : i + 7] for i in range(0, len(data), 7)), max_size=300) is (
        SniffFailure.TOO_LARGE
    )


def test_a_bound_too_small_for_any_client_hello_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        ClientHelloReader(8)
