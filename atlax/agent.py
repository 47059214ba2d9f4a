"""The agent: dials the relay, keeps the tunnel up, and forwards streams to local services.

The agent alone decides where streams go: the relay names a service, and only services listed
in the agent's own configuration are reachable. Certificates are read from disk on every
connection attempt, and a change on disk makes the agent dial a tunnel with the new files
before it lets the old one go (make before break).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import cast

import anyio
import anyio.abc
from proxyprotocol.result import (
    ProxyResult,
    ProxyResultIPv4,
    ProxyResultIPv6,
    ProxyResultLocal,
)
from proxyprotocol.v2 import ProxyProtocolV2
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from .config import AgentSettings, HostPort, ServiceTarget
from .logs import describe
from .mux import DatagramFlow, MuxSession, MuxStream, TunnelClosedError
from .protocol import (
    ALPN,
    ConnectionEnd,
    EndReason,
    ErrorCode,
    KeepaliveConfig,
    Origin,
    Role,
    Settings,
    error_name,
)
from .tls import TLSConfigError, agent_context, file_fingerprint

log = logging.getLogger("atlax.agent")

TUNNEL_SETTINGS = Settings(
    initial_window=1 << 20, max_frame_size=256 * 1024, max_streams=16384, datagrams=True
)
# A datagram for a UDP service is dropped rather than queued once its socket holds this much.
SOCKET_BACKLOG = 256 * 1024
# A tunnel that stayed up this long counts as healthy: the next reconnect starts a fresh backoff.
HEALTHY_AFTER = 10.0
# A connect with no answer after this long gets a fresh one beside it (see `dial`).
REDIAL_AFTER = 2.0
# After the relay said it is going away (a restart: rollout, `kubectl delete pod`), the backoff
# stays this short for RESTART_WINDOW seconds, so the agent is back as soon as the new relay is.
RESTART_BACKOFF_CAP = 1.0
RESTART_WINDOW = 60.0


class TunnelDownError(Exception):
    """One connection attempt failed or a tunnel ended early; the message says why."""


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        services: Mapping[str, HostPort | ServiceTarget],  # a HostPort is a TCP service
        *,
        cert_check_interval: float | None = None,
    ) -> None:
        self.settings = settings
        self.services = dict(services)
        self.cert_check_interval = cert_check_interval or settings.cert_check_interval
        self.session: MuxSession | None = None
        self.connected = anyio.Event()  # set on every successful connect, replaced on loss
        self.connects = 0
        self.last_error: str | None = None
        self._restart_until = 0.0  # short backoff until then: the relay announced a restart

    async def run(self) -> None:
        """Keep a tunnel up forever (until cancelled), with exponential backoff and full jitter."""
        s = self.settings
        while True:
            retrying = AsyncRetrying(
                wait=self._backoff,
                retry=retry_if_exception_type(TunnelDownError),
                sleep=anyio.sleep,
                before_sleep=self._log_retry,
            )
            async for attempt in retrying:
                with attempt:
                    await self._connect_once()
            # A healthy tunnel ended: reconnect soon, with a little jitter so that agents of a
            # restarted relay do not all arrive at the same instant.
            await anyio.sleep(random.uniform(0, s.backoff_initial))

    def _backoff(self, state: RetryCallState) -> float:
        """Exponential with full jitter; capped at RESTART_BACKOFF_CAP while a relay restarts."""
        s = self.settings
        restarting = anyio.current_time() < self._restart_until
        cap = min(s.backoff_cap, RESTART_BACKOFF_CAP) if restarting else s.backoff_cap
        return float(wait_random_exponential(multiplier=s.backoff_initial, max=cap)(state))

    def _log_retry(self, state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        exc = state.outcome.exception() if state.outcome else None
        log.warning("tunnel to %s down: %s; retrying in %.1fs", self.settings.relay, exc, delay)

    async def _connect_once(self) -> None:
        """Connect, serve until the tunnel ends. Raises TunnelDownError unless it was healthy.

        Certificate files that change on disk are a renewal, made before the old tunnel is
        broken: a new tunnel is dialled with them while the old one serves on; once the relay
        has the new one (it then sends new streams there and drains the old one), the old one
        is left to finish its open streams, for at most `drain_timeout`. If the new tunnel
        fails (say the relay does not accept the new key yet), the old one simply stays."""
        session, fingerprint = await self._dial()
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve, session)
            while await self._renewed(session, fingerprint):
                try:
                    new, renewed = await self._dial()
                    with anyio.fail_after(self.settings.connect_timeout):
                        await new.wait_ready()
                except (TunnelDownError, TunnelClosedError, TimeoutError) as exc:
                    log.warning(
                        "certificate files changed, but a tunnel with them failed (%s); the "
                        "current tunnel stays up and the new files are tried again in %gs",
                        exc or "timed out",
                        self.cert_check_interval,
                    )
                    continue
                tg.start_soon(self._serve, new)
                tg.start_soon(self._drain, session)
                session, fingerprint, started = new, renewed, anyio.current_time()
            tg.cancel_scope.cancel()  # the current tunnel ended: any draining one goes with it
        end = session.end
        reason = self._reason(end)
        self.last_error = reason
        goaway = end.code if end is not None and end.reason is EndReason.PEER_GOAWAY else None
        if goaway == ErrorCode.NO_ERROR:
            # The relay is going away (a rollout, a deleted pod): it is back in seconds.
            self._restart_until = anyio.current_time() + RESTART_WINDOW
        refused = goaway is not None and goaway != ErrorCode.NO_ERROR
        if not refused and anyio.current_time() - started >= HEALTHY_AFTER:
            log.warning("tunnel to %s ended: %s", self.settings.relay, reason)
            return
        raise TunnelDownError(reason)

    async def _dial(self) -> tuple[MuxSession, str]:
        """A TLS connection to the relay with the certificate files as they are now, and their
        fingerprint. Raises TunnelDownError saying why not."""
        s = self.settings
        fingerprint = file_fingerprint(s.cert, s.key, s.ca)
        try:
            context = agent_context(s.ca, s.cert, s.key)
        except TLSConfigError as exc:
            raise TunnelDownError(str(exc)) from None
        server_name = s.server_name or s.relay.host
        session = MuxSession(
            Role.CLIENT,
            settings=TUNNEL_SETTINGS,
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            handler=self._serve_stream,
            flow_handler=self._serve_flow,
            name="tunnel",
        )
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(s.connect_timeout):
                sock = await dial(s.relay.host, s.relay.port, redial_after=REDIAL_AFTER)
                transport, _ = await loop.create_connection(
                    lambda: session,
                    sock=sock,
                    ssl=context,
                    server_hostname=server_name,
                    ssl_handshake_timeout=s.connect_timeout + 1,
                )
        except TimeoutError:
            raise TunnelDownError(f"connecting timed out after {s.connect_timeout:g}s") from None
        except (OSError, ssl.SSLError, EOFError) as exc:
            raise TunnelDownError(describe(exc, peer="relay")) from None
        tls = transport.get_extra_info("ssl_object")
        if tls is None or tls.selected_alpn_protocol() != ALPN:
            transport.abort()
            raise TunnelDownError(f"relay did not negotiate ALPN {ALPN}")
        return session, fingerprint

    async def _serve(self, session: MuxSession) -> None:
        """Run one tunnel; it is the agent's current one from its SETTINGS until it ends."""
        async with anyio.create_task_group() as tg:

            async def announce() -> None:
                try:
                    await session.wait_ready()
                except TunnelClosedError:
                    return
                self.session = session
                self.connects += 1
                self.connected.set()
                log.info("tunnel up to %s", self.settings.relay)

            try:
                tg.start_soon(announce)
                await session.run()
                tg.cancel_scope.cancel()
            finally:
                if self.session is session:  # the current tunnel ended: say why, then that
                    self.last_error = self._reason(session.end)
                    self.session = None
                    self.connected = anyio.Event()

    async def _renewed(self, session: MuxSession, fingerprint: str) -> bool:
        """True once the certificate files differ from `fingerprint`; False when `session`
        has ended first."""
        s = self.settings
        while True:
            with anyio.move_on_after(self.cert_check_interval):
                await session.wait_closed()
                return False
            if file_fingerprint(s.cert, s.key, s.ca) != fingerprint:
                log.info("certificate files changed on disk: dialling a tunnel with them")
                return True

    async def _drain(self, session: MuxSession) -> None:
        """A replaced tunnel finishes its open streams, for at most drain_timeout."""
        grace = self.settings.drain_timeout
        session.close(ErrorCode.NO_ERROR, "agent certificate renewed")
        with anyio.move_on_after(grace):
            await session.wait_closed()
            return
        log.info("the replaced tunnel still had streams after %gs: closing them", grace)
        session.close(ErrorCode.CANCEL, f"not drained within {grace:g}s of a renewal")

    @staticmethod
    def _reason(end: ConnectionEnd | None) -> str:
        if end is None:
            return "tunnel closed"
        if end.reason is EndReason.PEER_GOAWAY and end.code != ErrorCode.NO_ERROR:
            return f"relay closed the tunnel ({error_name(end.code)}): {end.detail}"
        if end.reason is EndReason.PEER_GOAWAY:
            return f"relay is going away: {end.detail or 'no reason given'}"
        return str(end)

    async def _serve_stream(self, stream: MuxStream) -> None:
        target = self.services.get(stream.service)
        if target is None or _is_udp(target):
            kind = "unknown service" if target is None else "a TCP stream to UDP service"
            log.warning("relay asked for %s %r; refusing", kind, stream.service)
            stream.reset(ErrorCode.UNKNOWN_SERVICE)
            return
        if stream.proxy_protocol == 2:
            stream.preamble = proxy_v2_header(stream.origin)
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(self.settings.connect_timeout):
                # The stream becomes the socket's protocol: bytes then move in callbacks.
                await loop.create_connection(lambda: stream, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            log.warning(
                "service %r at %s: connect failed: %s", stream.service, target, describe(exc)
            )
            stream.reset(ErrorCode.CONNECT_FAILED)

    async def _serve_flow(self, flow: DatagramFlow) -> None:
        """A UDP flow: its own socket, connected to the service, so replies find the flow."""
        target = self.services.get(flow.service)
        if target is None or not _is_udp(target):
            kind = "unknown service" if target is None else "a UDP flow to TCP service"
            log.warning("relay asked for %s %r; refusing", kind, flow.service)
            flow.close(ErrorCode.UNKNOWN_SERVICE)
            return
        loop = asyncio.get_running_loop()
        try:
            transport, service = await loop.create_datagram_endpoint(
                lambda: _ServiceSocket(flow), remote_addr=(target.host, target.port)
            )
        except OSError as exc:
            log.warning("service %r at %s: %s", flow.service, target, describe(exc))
            flow.close(ErrorCode.CONNECT_FAILED)
            return
        flow.attach(service.deliver, transport.close)


class _ServiceSocket(asyncio.DatagramProtocol):
    """A UDP flow's socket toward its service: datagrams both ways, dropped rather than held."""

    def __init__(self, flow: DatagramFlow) -> None:
        self._flow = flow
        self._transport: asyncio.DatagramTransport | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def deliver(self, datagram: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if cast(asyncio.WriteTransport, transport).get_write_buffer_size() > SOCKET_BACKLOG:
            self.dropped += 1
            return
        transport.sendto(datagram)

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._flow.send(data)

    def error_received(self, exc: Exception) -> None:
        # ECONNREFUSED: an ICMP port unreachable, the service is down. The relay forgets the
        # flow; the client's next datagram opens a new one.
        log.debug("UDP service %r: %s", self._flow.service, describe(exc))
        self._flow.close(ErrorCode.CONNECT_FAILED)


def _is_udp(target: HostPort | ServiceTarget) -> bool:
    return isinstance(target, ServiceTarget) and target.protocol == "udp"


async def dial(host: str, port: int, *, redial_after: float) -> socket.socket:
    """A connected TCP socket to host:port; the caller bounds the time (cancellation).

    An attempt still unanswered after `redial_after` seconds gets a fresh one beside it: the name
    resolved again, a new source port. After a relay pod is replaced, the first SYN can sit in a
    NAT entry that still points at the dead pod until the connect times out, while a new
    connection reaches the new pod at once. The first attempt to connect wins; an attempt that
    fails while none is pending ends the dial with its error.
    """
    loop = asyncio.get_running_loop()
    attempts: set[asyncio.Task[socket.socket]] = set()
    error: BaseException | None = None
    try:
        while True:
            attempts.add(loop.create_task(_connect(loop, host, port)))
            done, _ = await asyncio.wait(
                attempts, timeout=redial_after, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                attempts.discard(task)
                if task.exception() is None:
                    return task.result()
                error = task.exception()
            if not attempts:
                assert error is not None
                raise error
    finally:
        for task in attempts:
            task.cancel()
        if attempts:
            with anyio.CancelScope(shield=True):
                await asyncio.wait(attempts)
            for task in attempts:  # connected after another attempt had won
                if not task.cancelled() and task.exception() is None:
                    task.result().close()


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    error: OSError | None = None
    for family, type_, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            # asyncio says "Connect call failed (address)": keep the errno's own words.
            error = type(exc)(exc.errno, os.strerror(exc.errno)) if exc.errno else exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"{host} has no address")


def proxy_v2_header(origin: Origin | None) -> bytes:
    """The PROXY protocol v2 header naming the public client (LOCAL if the relay sent none)."""
    result: ProxyResult
    if origin is None:
        result = ProxyResultLocal()
    elif origin.source.version == 4:
        result = ProxyResultIPv4(
            (IPv4Address(int(origin.source)), origin.source_port),
            (IPv4Address(int(origin.destination)), origin.destination_port),
            protocol=socket.SOCK_STREAM,
        )
    else:
        result = ProxyResultIPv6(
            (IPv6Address(int(origin.source)), origin.source_port),
            (IPv6Address(int(origin.destination)), origin.destination_port),
            protocol=socket.SOCK_STREAM,
        )
    return ProxyProtocolV2().pack(result)
