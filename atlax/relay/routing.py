"""Ports shared by hostname: read a client's first bytes, pick the service, join it.

On a port whose services say `route = "tls"` or `route = "http"`, an accepted socket first gets a
`_Sniffer` as its protocol. It feeds what arrives to the ClientHello reader or the request-head
reader (`atlax/sniff/`) until one names a hostname, the bytes break a rule, the reader's size
bound is reached or `route_timeout` passes. The service is then the port's for that name (exact,
then the longest wildcard); the port's refusal policy runs as for any client; and the stream takes
the socket over with every byte read so far as its first data. The relay never terminates or
decrypts the client's TLS. No task per connection: callbacks and one timer handle.

Until it is routed, a connection counts toward its port's `max_connections_per_port` and
`max_connections_per_source` (on top of the connections already routed), so clients that never
finish their hello hold at most that many sockets and a size-bounded buffer each.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from ..net import abort_transport, close_with_reset, origin_of, set_keepalive
from ..protocol import Origin
from ..sniff import (
    ClientHello,
    ClientHelloReader,
    NeedData,
    RequestHeadReader,
    SniffError,
    SniffFailure,
    http_response,
)
from .policy import Refusal
from .registry import PublicPort

if TYPE_CHECKING:
    from .ports import PublicPorts

log = logging.getLogger("atlax.relay")

_SNIFF_REFUSALS = {
    SniffFailure.NOT_TLS: Refusal.NOT_TLS,
    SniffFailure.NOT_HTTP: Refusal.NOT_HTTP,
    SniffFailure.MALFORMED: Refusal.MALFORMED,
    SniffFailure.TOO_LARGE: Refusal.TOO_LARGE,
}
# What an HTTP client is told before its connection closes, by refusal (others get a TCP RST).
_HTTP_ANSWERS = {
    Refusal.UNKNOWN_HOST: (421, "no service on this port serves that host"),
    Refusal.NO_HOSTNAME: (421, "the request names no hostname"),
    Refusal.MALFORMED: (400, "malformed HTTP request"),
    Refusal.TOO_LARGE: (431, "request head too large"),
}


class Router:
    """Takes the accepted connections of shared ports until each is routed or refused."""

    def __init__(self, ports: PublicPorts) -> None:
        self.ports = ports

    async def take(self, public: PublicPort, client: socket.socket) -> None:
        settings = self.ports.settings
        origin = origin_of(client)
        source = origin.source if origin is not None else None
        reason = None
        if public.sniffing >= settings.max_connections_per_port:
            reason = Refusal.PORT_LIMIT
        elif public.sniffing_by_source.get(source, 0) >= settings.max_connections_per_source:
            reason = Refusal.SOURCE_LIMIT
        if reason is not None:
            self.ports.refuse(public.key.port, origin, reason, f"{reason.text} (being routed)")
            close_with_reset(client)
            return
        sniffer = _Sniffer(self, public, origin)
        set_keepalive(client)
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: sniffer, client)
        except (OSError, ValueError) as exc:
            log.debug("port %d: client gone before it was read: %s", public.key.port, exc)
            sniffer.finish()
            close_with_reset(client)

    def refuse(
        self,
        public: PublicPort,
        transport: asyncio.Transport,
        origin: Origin | None,
        reason: Refusal,
        detail: str | None = None,
    ) -> None:
        self.ports.refuse(public.key.port, origin, reason, detail)
        answer = _HTTP_ANSWERS.get(reason) if public.route == "http" else None
        if answer is None:
            abort_transport(transport)
            return
        transport.write(http_response(*answer))
        transport.close()

    def route(
        self,
        public: PublicPort,
        transport: asyncio.Transport,
        origin: Origin | None,
        hostname: str | None,
        received: bytes,
    ) -> None:
        """The first bytes named `hostname`: join the client to that service's new stream."""
        if hostname is None:
            self.refuse(public, transport, origin, Refusal.NO_HOSTNAME)
            return
        binding = public.lookup(hostname)
        if binding is None:
            detail = f"no service on this port serves {hostname!r}"
            self.refuse(public, transport, origin, Refusal.UNKNOWN_HOST, detail)
            return
        stream = self.ports.open_stream(binding, origin)
        if stream is None:  # refused by the port's policy (counted), or the tunnel just closed
            abort_transport(transport)
            return
        transport.set_protocol(stream)
        stream.connection_made(transport)
        stream.data_received(received)


class _Sniffer(asyncio.Protocol):
    """The protocol of a shared port's socket until its first bytes name a service."""

    __slots__ = ("_done", "_origin", "_public", "_reader", "_router", "_timer", "_transport")

    def __init__(self, router: Router, public: PublicPort, origin: Origin | None) -> None:
        self._router = router
        self._public = public
        self._origin = origin
        self._reader: ClientHelloReader | RequestHeadReader = (
            ClientHelloReader() if public.route == "tls" else RequestHeadReader()
        )
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        source = self._source
        public.sniffing += 1
        public.sniffing_by_source[source] = public.sniffing_by_source.get(source, 0) + 1

    @property
    def _source(self) -> Any:
        return self._origin.source if self._origin is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        timeout = self._router.ports.settings.route_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            result = self._reader.feed(data)
        except SniffError as exc:
            self._refuse(_SNIFF_REFUSALS[exc.failure], str(exc))
            return
        if isinstance(result, NeedData):
            return
        self.finish()
        hostname = result.server_name if isinstance(result, ClientHello) else result.host
        assert self._transport is not None
        self._router.route(
            self._public, self._transport, self._origin, hostname, self._reader.received
        )

    def eof_received(self) -> bool:
        self.finish()  # the client gave up before naming a host: nothing to refuse or count
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()

    def _timed_out(self) -> None:
        self._refuse(Refusal.ROUTE_TIMEOUT)

    def _refuse(self, reason: Refusal, detail: str | None = None) -> None:
        self.finish()
        assert self._transport is not None
        self._router.refuse(self._public, self._transport, self._origin, reason, detail)

    def finish(self) -> None:
        """Stop counting this connection as one being routed (once)."""
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        public, source = self._public, self._source
        public.sniffing -= 1
        left = public.sniffing_by_source[source] - 1
        if left:
            public.sniffing_by_source[source] = left
        else:
            del public.sniffing_by_source[source]
