"""The server name of a TLS ClientHello, read from a connection's first bytes; never decrypted.

`ClientHelloReader.feed(data)` answers NEED_DATA, a `ClientHello`, or raises `SniffError`.
What is checked is what RFC 8446 (TLS 1.3, and the TLS 1.2 ClientHello it stays compatible
with) and RFC 6066 (server_name) say about the bytes before the server speaks:

- Records (RFC 8446 5.1): content type handshake (22), a legacy version of 3.x (ignored beyond
  that, as the RFC says), a length of 1..2^14. A ClientHello may be split over any number of
  records, and no record of another type may come between them.
- The handshake message (4): type client_hello (1), a uint24 length, then exactly that many bytes:
  legacy_version (3.x), random, legacy_session_id <0..32>, cipher_suites <2..2^16-2> (even),
  legacy_compression_methods <1..2^8-1>, and extensions <0..2^16-1>, which may be absent
  altogether (a TLS 1.2 client without extensions). No extension type twice (4.2).
- server_name (RFC 6066 3): a ServerNameList <1..2^16-1> of (NameType, opaque<1..2^16-1>); at most
  one host_name (0); other name types are skipped. The host_name must be a hostname under the
  rule of `hostnames.py` (ASCII, no IP literal); one trailing dot is forgiven.

Bytes arrive in any split. The reader holds at most `max_size` bytes (record headers included)
before it has an answer: a ClientHello that needs more is TOO_LARGE. An answer is reached as early
as the bytes allow: the first byte of garbage is NOT_TLS, and a length that could never fit is
refused before the bytes behind it arrive. With Encrypted Client Hello (ECH) the server name read
here is the outer, public one, which is what a relay that does not decrypt can route by.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NEED_DATA, NeedData, SniffError, SniffFailure
from .hostnames import InvalidHostnameError, normalize_hostname

HANDSHAKE = 22
CLIENT_HELLO = 1
RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
MAX_RECORD = 1 << 14  # a TLSPlaintext fragment (RFC 8446 5.1)
EXT_SERVER_NAME = 0
HOST_NAME = 0
# The largest ClientHello body the RFC's vectors allow: version, random, session id, cipher
# suites, compression methods, extensions, each at its maximum length.
MAX_BODY = 2 + 32 + (1 + 32) + (2 + 65534) + (1 + 255) + (2 + 65535)
# What nginx's ssl_preread and HAProxy read at most by default; a ClientHello with post-quantum
# key shares is about 2 KB.
DEFAULT_MAX_SIZE = 16 * 1024


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # normalized (hostnames.py); None when the client sent none


def _malformed(message: str) -> SniffError:
    return SniffError(SniffFailure.MALFORMED, f"malformed ClientHello: {message}")


class ClientHelloReader:
    """Feeds on a connection's first bytes until the ClientHello's server name is known."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < RECORD_HEADER + HANDSHAKE_HEADER:
            raise ValueError(f"max_size {max_size} cannot hold a record and a handshake header")
        self.max_size = max_size
        self._seen = 0  # bytes fed so far
        self._header = bytearray()  # the record header being read
        self._records = 0  # records started
        self._left = 0  # payload bytes still to come in the current record
        self._message = bytearray()  # handshake bytes, record headers removed
        self._received = bytearray()
        self._result: ClientHello | None = None

    @property
    def received(self) -> bytes:
        """Every byte fed until the answer, as it was fed: what the relay forwards first."""
        return bytes(self._received)

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | NeedData:
        """Take the next bytes. Once a ClientHello is returned, later bytes are not looked at.

        Bytes past `max_size` are never parsed, so the answer does not depend on how the bytes
        were split: a ClientHello that ends within `max_size` bytes is read, any other is
        TOO_LARGE unless an error came first.
        """
        if self._result is not None:
            return self._result
        self._received += data
        view = memoryview(data).cast("B")
        end = min(len(view), self.max_size - self._seen)
        self._seen += end
        pos = 0
        while pos < end:
            if self._left == 0:
                take = min(RECORD_HEADER - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                self._check_record_header()
                if len(self._header) < RECORD_HEADER:
                    break
                self._left = int.from_bytes(self._header[3:5], "big")
                self._header.clear()
                self._records += 1
            take = min(self._left, end - pos)
            self._message += view[pos : pos + take]
            self._left -= take
            pos += take
            result = self._check_message()
            if result is not None:
                self._result = result
                self._message = bytearray()
                return result
        if self._seen >= self.max_size:
            raise SniffError(
                SniffFailure.TOO_LARGE,
                f"ClientHello not complete within {self.max_size} bytes",
            )
        return NEED_DATA

    def _check_record_header(self) -> None:
        header = self._header
        first = self._records == 0
        if header[:1] and header[0] != HANDSHAKE:
            if first:
                raise SniffError(
                    SniffFailure.NOT_TLS,
                    f"not a TLS handshake (first byte 0x{header[0]:02x}, expected 0x16)",
                )
            raise _malformed(f"a record of type {header[0]} inside the ClientHello")
        if header[1:2] and header[1] != 3:
            if first:
                raise SniffError(
                    SniffFailure.NOT_TLS, f"not a TLS record (version byte 0x{header[1]:02x})"
                )
            raise _malformed(f"a record with version byte 0x{header[1]:02x}")
        if len(header) == RECORD_HEADER:
            length = int.from_bytes(header[3:5], "big")
            if length == 0:
                raise _malformed("an empty handshake record")
            if length > MAX_RECORD:
                raise _malformed(f"a record of {length} bytes, more than 2^14")

    def _check_message(self) -> ClientHello | None:
        """The parsed ClientHello once all of it is here; errors as soon as one is certain."""
        message = self._message
        if not message:
            return None
        if message[0] != CLIENT_HELLO:
            raise _malformed(f"the first handshake message has type {message[0]}, not 1")
        if len(message) < HANDSHAKE_HEADER:
            return None
        length = int.from_bytes(message[1:4], "big")
        if length > MAX_BODY:
            raise _malformed(f"a length of {length} bytes, more than RFC 8446 allows")
        total = HANDSHAKE_HEADER + length
        records = -(-total // MAX_RECORD)  # the fewest records that can carry it
        if total + RECORD_HEADER * records > self.max_size:
            raise SniffError(
                SniffFailure.TOO_LARGE,
                f"ClientHello of {total} bytes is larger than the limit of {self.max_size}",
            )
        if len(message) < total:
            return None
        return ClientHello(_server_name(memoryview(bytes(message[HANDSHAKE_HEADER:total]))))


class _Cursor:
    """Reads the length-prefixed vectors of RFC 8446 3.4 from a view, end checked on every read."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining:
            raise _malformed(f"{what} runs past its end")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def rest(self) -> bytes:
        return bytes(self.take(self.remaining, ""))

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, low: int, high: int, what: str) -> _Cursor:
        """A vector with a `size`-byte length prefix whose length must be in low..high."""
        length = self.uint(size, what)
        if not low <= length <= high:
            raise _malformed(f"{what} of {length} bytes (allowed {low}..{high})")
        return _Cursor(self.take(length, what))


def _server_name(body: memoryview) -> str | None:
    hello = _Cursor(body)
    if hello.uint(1, "legacy_version") != 3:
        raise _malformed("legacy_version is not 3.x")
    hello.take(1 + 32, "random")
    hello.vector(1, 0, 32, "legacy_session_id")
    suites = hello.vector(2, 2, 65534, "cipher_suites")
    if suites.remaining % 2:
        raise _malformed("cipher_suites has an odd length")
    hello.vector(1, 1, 255, "legacy_compression_methods")
    if hello.remaining == 0:
        return None  # no extensions at all (TLS 1.2 and older allow it)
    extensions = hello.vector(2, 0, 65535, "extensions")
    if hello.remaining:
        raise _malformed(f"{hello.remaining} bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    while extensions.remaining:
        kind = extensions.uint(2, "extension type")
        data = extensions.vector(2, 0, 65535, "extension")
        if kind in seen:
            raise _malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: _Cursor) -> str | None:
    names = data.vector(2, 1, 65535, "server_name list")
    if data.remaining:
        raise _malformed("bytes after the server_name list")
    host: str | None = None
    while names.remaining:
        kind = names.uint(1, "server name type")
        value = names.vector(2, 1, 65535, "server name").rest()
        if kind != HOST_NAME:
            continue  # a name type this reader does not know (RFC 6066 defines only host_name)
        if host is not None:
            raise _malformed("server_name has two host names")
        try:
            host = normalize_hostname(value.decode("latin-1"))
        except InvalidHostnameError as exc:
            raise _malformed(f"server name: {exc}") from None
    return host
