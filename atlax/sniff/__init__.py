"""Reading where a public connection wants to go from its first bytes, without I/O.

The relay routes a shared public port by hostname: the server name of a TLS ClientHello
(`tls.py`, read, never decrypted) or the Host of an HTTP request head (`http.py`, read with h11).
Both hand their names to the one hostname rule and matcher in `hostnames.py`. Everything here is
pure, in the protocol core's style: bytes in; "need more", a result, or a typed error out. No
sockets, no clock: the shell bounds the time a client may take (docs/routing.md).
"""

from __future__ import annotations

from .errors import NEED_DATA, NeedData, SniffError, SniffFailure
from .hostnames import HostnameTable, InvalidHostnameError, normalize_hostname, parse_pattern
from .http import RequestHead, RequestHeadReader, http_response
from .tls import ClientHello, ClientHelloReader

__all__ = [
    "NEED_DATA",
    "ClientHello",
    "ClientHelloReader",
    "HostnameTable",
    "InvalidHostnameError",
    "NeedData",
    "RequestHead",
    "RequestHeadReader",
    "SniffError",
    "SniffFailure",
    "http_response",
    "normalize_hostname",
    "parse_pattern",
]
