"""The request-head reader: the host of the first request, bounded, on any split."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlax.sniff import (
    NEED_DATA,
    RequestHead,
    RequestHeadReader,
    SniffError,
    SniffFailure,
    http_response,
)

CURL = (
    b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: nas.example.com\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)


def read(*chunks: bytes, max_size: int = 16384) -> RequestHead | SniffError | None:
    reader = RequestHeadReader(max_size)
    try:
        for chunk in chunks:
            result = reader.feed(chunk)
            if isinstance(result, RequestHead):
                return result
    except SniffError as exc:
        return exc
    return None


def host(data: bytes) -> str | None:
    result = read(data)
    assert isinstance(result, RequestHead), result
    return result.host


def failure(data: bytes, max_size: int = 16384) -> SniffFailure:
    result = read(data, max_size=max_size)
    assert isinstance(result, SniffError), result
    assert "\n" not in str(result)
    return result.failure


def test_a_curl_request() -> None:
    assert read(CURL) == RequestHead(
        "GET", "/.well-known/acme-challenge/tok", "1.1", "nas.example.com"
    )


@given(st.data())
def test_any_split(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(CURL)), max_size=6)))
    chunks = [CURL[a:b] for a, b in zip([0, *cuts], [*cuts, len(CURL)], strict=True)]
    assert read(*chunks) == read(CURL)


def test_every_proper_prefix_needs_more_and_later_bytes_are_ignored() -> None:
    reader = RequestHeadReader()
    for i in range(len(CURL) - 1):
        assert reader.feed(CURL[i : i + 1]) is NEED_DATA
    result = reader.feed(CURL[-1:] + b"body bytes, or the next request")
    assert isinstance(result, RequestHead) and reader.feed(b"more") == result
    assert reader.received == CURL + b"body bytes, or the next request"  # forwarded unchanged


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: NAS.Example.com:8080\r\n\r\n", "nas.example.com"),
        (b"GET / HTTP/1.1\r\nHost: nas.example.com.\r\n\r\n", "nas.example.com"),
        (
            b"GET http://photos.example.com/x HTTP/1.1\r\nHost: nas.example.com\r\n\r\n",
            "photos.example.com",
        ),
        (
            b"GET http://u:p@photos.example.com:81/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "photos.example.com",
        ),
        (b"GET / HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\n\r\n", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None),  # HTTP/2 prior knowledge: no Host
        (b"OPTIONS * HTTP/1.1\r\nHost: nas.example.com\r\n\r\n", "nas.example.com"),
    ],
)
def test_the_host(head: bytes, expected: str | None) -> None:
    assert host(head) == expected


def test_a_tls_client_hello_is_not_http_at_its_first_byte() -> None:
    assert failure(b"\x16") is SniffFailure.NOT_HTTP
    assert failure(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") is SniffFailure.NOT_HTTP


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: bad host\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: -a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET /\r\n\r\n",
    ],
)
def test_malformed_requests(head: bytes) -> None:
    assert failure(head) is SniffFailure.MALFORMED


def test_a_head_past_the_bound_is_too_large_however_it_arrives() -> None:
    head = b"GET / HTTP/1.1\r\nHost: nas.example.com\r\nX: " + b"a" * 2000 + b"\r\n\r\n"
    assert failure(head, max_size=1024) is SniffFailure.TOO_LARGE
    assert failure(head[:1000] + b"", max_size=1000) is SniffFailure.TOO_LARGE
    chunks = [head[i : i + 100] for i in range(0, len(head), 100)]
    result = read(*chunks, max_size=1024)
    assert isinstance(result, SniffError) and result.failure is SniffFailure.TOO_LARGE
    assert isinstance(read(head, max_size=len(head)), RequestHead)
    assert isinstance(read(head + b"a body" * 1000, max_size=len(head)), RequestHead)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_give_an_answer_or_a_sniff_error(chunks: list[bytes]) -> None:
    read(*chunks, max_size=1024)  # anything but a SniffError propagates and fails


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(1, 300), st.data())
def test_the_answer_does_not_depend_on_the_split(
    tail: bytes, max_size: int, data: st.DataObject
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a.example\r\n" + tail
    cut = data.draw(st.integers(0, len(raw)))
    whole, split = read(raw, max_size=max_size), read(raw[:cut], raw[cut:], max_size=max_size)
    if isinstance(whole, SniffError):
        assert isinstance(split, SniffError) and split.failure is whole.failure
    else:
        assert split == whole


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"GET", b" ", b"/", b"\r\n", b"Host: a.example", b":", b"1"])))
def test_request_shaped_bytes_give_an_answer_or_a_sniff_error(parts: list[bytes]) -> None:
    read(b"".join(parts), max_size=1024)


def test_refusal_responses() -> None:
    response = http_response(421, "no service for host 'x.example' here")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 421 Misdirected Request"
    assert b"Connection: close" in head and f"Content-Length: {len(body)}".encode() in head
    assert body == b"no service for host 'x.example' here\n"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /" + b"\x01" * 8000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad header " + b"x" * 8000 + b"\r\n\r\n",
    ],
)
def test_a_malformed_head_is_described_without_echoing_it(head: bytes) -> None:
    """The reason goes into the relay's log: h11 quotes the offending line (up to 16 KiB of the
    client's bytes, as a bytearray repr); the log line names what was wrong, briefly."""
    error = read(head)
    assert isinstance(error, SniffError) and error.failure is SniffFailure.MALFORMED
    assert "bytearray" not in str(error) and "xxxx" not in str(error), str(error)
    assert len(str(error)) < 200
