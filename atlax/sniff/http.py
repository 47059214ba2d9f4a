"""The host an HTTP/1.x request is for, read from its head with h11; the bytes stay the caller's.

`RequestHeadReader.feed(data)` answers NEED_DATA, a `RequestHead`, or raises `SniffError`. Only
the first request's head is read: the relay forwards the bytes exactly as they arrived (the head
and whatever followed it) and from then on the connection is a plain stream, so keep-alive
requests after the first go where the first went (as frp's vhost and sish do). h11 enforces
RFC 9112 (one Host in HTTP/1.1, header syntax) and bounds the head at `max_size` bytes; it also
rejects bytes that cannot start a request line at once, so a TLS ClientHello sent to an HTTP
port is refused without waiting.

The host is that of an absolute-form target (`GET http://nas.example.com/ HTTP/1.1`, which RFC
9112 3.2.2 says wins over Host), else the Host header's, without its port. A host that is an IP
address, or a request without one (HTTP/1.0 without Host; HTTP/2 prior knowledge), has no
hostname: `host` is None and the caller answers that it serves no such host.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from http import HTTPStatus

import h11

from .errors import NEED_DATA, NeedData, SniffError, SniffFailure
from .hostnames import InvalidHostnameError, is_ip_literal, normalize_hostname

DEFAULT_MAX_SIZE = 16 * 1024  # h11's own default for an incomplete event
# host [":" port] with an IP-literal host in brackets (RFC 3986 3.2.2); the host is checked after.
_AUTHORITY = re.compile(rb"(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]@/?#\s]*)(?::[0-9]*)?")
# A method is a token (RFC 9110 5.6.2): a first byte outside these is not HTTP at all.
_TCHAR = frozenset((string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~").encode())
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    http_version: str
    host: str | None  # normalized (hostnames.py); None when the request names no hostname


class RequestHeadReader:
    """Feeds on a connection's first bytes until the first request head is complete."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_size)
        self._result: RequestHead | None = None
        self._started_like_http: bool | None = None
        self._seen = 0
        self._received = bytearray()

    @property
    def received(self) -> bytes:
        """Every byte fed until the head was complete, as it was fed: what the relay forwards
        first (the head, and whatever came with it)."""
        return bytes(self._received)

    def feed(self, data: bytes | bytearray | memoryview) -> RequestHead | NeedData:
        """Take the next bytes. As in the ClientHello reader, bytes past `max_size` are never
        parsed, so a head is read if it ends within `max_size` bytes however they were split."""
        if self._result is not None or not data:  # h11 takes b"" for the end of the stream
            return self._result or NEED_DATA
        self._received += data
        view = memoryview(data).cast("B")
        if self._started_like_http is None:
            self._started_like_http = view[0] in _TCHAR
        chunk = bytes(view[: self.max_size - self._seen])
        self._seen += len(chunk)
        try:
            self._conn.receive_data(chunk)
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:
                raise self._too_large() from None
            if not self._started_like_http:
                raise SniffError(SniffFailure.NOT_HTTP, "not an HTTP request") from None
            raise SniffError(
                SniffFailure.MALFORMED, f"malformed HTTP request: {_brief(exc)}"
            ) from None
        if event is h11.NEED_DATA:
            if self._seen >= self.max_size:
                raise self._too_large()
            return NEED_DATA
        assert isinstance(event, h11.Request)  # the first event of a server that saw no EOF
        self._result = RequestHead(
            method=event.method.decode("ascii"),
            target=event.target.decode("ascii"),
            http_version=event.http_version.decode("ascii"),
            host=_host(event),
        )
        return self._result

    def _too_large(self) -> SniffError:
        return SniffError(
            SniffFailure.TOO_LARGE, f"HTTP request head not complete within {self.max_size} bytes"
        )


def _host(request: h11.Request) -> str | None:
    absolute = _ABSOLUTE.match(request.target)
    if absolute is not None:
        authority = absolute.group(1).rpartition(b"@")[2]  # userinfo@ is not part of the host
    else:
        hosts = [value for name, value in request.headers if name == b"host"]
        if not hosts:
            return None
        authority = hosts[0]
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        raise SniffError(SniffFailure.MALFORMED, f"malformed Host {authority!r}")
    host = match.group("host").decode("latin-1")
    if not host or host.startswith("[") or is_ip_literal(host.removesuffix(".")):
        return None  # no name, or an IP address: routes nowhere
    try:
        return normalize_hostname(host)
    except InvalidHostnameError as exc:
        raise SniffError(SniffFailure.MALFORMED, f"malformed Host: {exc}") from None


def http_response(status: int, text: str) -> bytes:
    """A complete short plain-text response that closes the connection (421, 400, ...)."""
    body = (text.rstrip("\n") + "\n").encode("utf-8")
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _brief(exc: h11.RemoteProtocolError) -> str:
    """h11's reason without the line it quotes ("illegal header line: bytearray(b'...')"): that
    is up to 16 KiB of the client's bytes, and the reason goes into the relay's log."""
    text = str(exc).split(": bytearray(", 1)[0].split(": b'", 1)[0]
    return text if len(text) <= 100 else text[:100] + "..."
