"""One tunnel of the agent: dial the relay address, learn which instance answered, and either keep
the tunnel (JOIN) or close it as a duplicate (docs/protocol.md, "Relay instances").

Certificates are read from disk on every dial, so a renewed certificate is used by the next
tunnel; the fingerprint of the files a tunnel was made with tells the pool which ones to replace.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import anyio

from ..config import AgentSettings
from ..logs import describe
from ..mux import MuxSession, TunnelClosedError
from ..protocol import (
    ALPN,
    ConnectionEnd,
    EndReason,
    ErrorCode,
    KeepaliveConfig,
    Role,
    Settings,
    error_name,
)
from ..tls import TLSConfigError, agent_context, file_fingerprint
from .policy import Failure
from .services import Services

# TUNNEL_POOL: this agent keeps a tunnel per relay instance (cluster extension).
TUNNEL_SETTINGS = Settings(
    initial_window=1 << 20,
    max_frame_size=256 * 1024,
    max_streams=16384,
    datagrams=True,
    tunnel_pool=True,
)
# A connect with no answer after this long gets a fresh one beside it (see `dial`).
REDIAL_AFTER = 2.0


class DialFailed(Exception):
    """A dial got no usable tunnel; `failure` says whether to back off, the message why."""

    def __init__(self, failure: Failure, reason: str) -> None:
        super().__init__(reason)
        self.failure = failure


def describe_end(end: ConnectionEnd | None) -> str:
    """Why a tunnel ended, as the agent logs it."""
    if end is None:
        return "tunnel closed"
    if end.reason is EndReason.PEER_GOAWAY and end.code != ErrorCode.NO_ERROR:
        return f"relay closed the tunnel ({error_name(end.code)}): {end.detail}"
    if end.reason is EndReason.PEER_GOAWAY:
        return f"relay is going away: {end.detail or 'no reason given'}"
    return str(end)


def refused(end: ConnectionEnd | None) -> bool:
    """The relay ended the tunnel with an error (a refused identity, a flood): back off."""
    return (
        end is not None and end.reason is EndReason.PEER_GOAWAY and end.code != ErrorCode.NO_ERROR
    )


def going_away(end: ConnectionEnd | None) -> bool:
    """The relay said it is going away (GOAWAY NO_ERROR: a rollout, a deleted pod)."""
    return (
        end is not None and end.reason is EndReason.PEER_GOAWAY and end.code == ErrorCode.NO_ERROR
    )


class Tunnel:
    def __init__(self, settings: AgentSettings, services: Services) -> None:
        self.settings = settings
        s = settings
        self.session = MuxSession(
            Role.CLIENT,
            settings=TUNNEL_SETTINGS,
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            handler=services.serve,
            flow_handler=services.serve_flow,
            name="tunnel",
        )
        self.fingerprint = file_fingerprint(s.cert, s.key, s.ca)
        self.instance: int | None = None  # the relay instance's id; None: an old relay
        self.size: int | None = None  # the cluster size it advertised
        self.peer = ""
        self.up_at = 0.0  # when it was kept, on anyio's clock
        self.retiring = False  # made with certificate files that changed since

    @property
    def name(self) -> str:
        return "relay" if self.instance is None else f"instance {self.instance:08x}"

    async def dial(self) -> None:
        """Connect, TLS, the relay's SETTINGS; raises DialFailed (the session is then over)."""
        try:
            await self._dial()
        except DialFailed:
            self.session.close(ErrorCode.CANCEL, "dial failed")
            raise

    async def _dial(self) -> None:
        s = self.settings
        try:
            context = agent_context(s.ca, s.cert, s.key)
        except TLSConfigError as exc:
            raise DialFailed(Failure.REFUSED, str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(s.connect_timeout):
                # The name is resolved again on every dial: a replaced relay may have moved.
                sock = await dial(s.relay.host, s.relay.port, redial_after=REDIAL_AFTER)
                transport, _ = await loop.create_connection(
                    lambda: self.session,
                    sock=sock,
                    ssl=context,
                    server_hostname=s.server_name or s.relay.host,
                    ssl_handshake_timeout=s.connect_timeout + 1,
                )
                tls = transport.get_extra_info("ssl_object")
                if tls is None or tls.selected_alpn_protocol() != ALPN:
                    transport.abort()
                    raise DialFailed(Failure.REFUSED, f"relay did not negotiate ALPN {ALPN}")
                peer = transport.get_extra_info("peername")
                self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
                await self.session.wait_ready()
        except TimeoutError:
            raise DialFailed(
                Failure.NETWORK, f"connecting timed out after {s.connect_timeout:g}s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            reason = f"relay certificate rejected: {exc.verify_message}"
            raise DialFailed(Failure.REFUSED, reason) from None
        except ssl.SSLError as exc:
            raise DialFailed(Failure.REFUSED, describe(exc, peer="relay")) from None
        except (OSError, EOFError) as exc:
            raise DialFailed(Failure.NETWORK, describe(exc, peer="relay")) from None
        except TunnelClosedError:
            end = self.session.end
            failure = Failure.REFUSED if refused(end) else Failure.NETWORK
            raise DialFailed(failure, describe_end(end)) from None
        peer_settings = self.session.peer_settings
        assert peer_settings is not None
        self.instance = peer_settings.instance_id or None
        self.size = peer_settings.cluster_size or None

    def join(self) -> None:
        """Keep it: JOIN (a relay without instances needs none: its SETTINGS were enough)."""
        if self.session.conn.cluster_extension:
            self.session.join_cluster()

    async def close_duplicate(self) -> None:
        """Close a tunnel that reached an instance already held; it never carried a stream."""
        self.session.close(ErrorCode.NO_ERROR, f"duplicate tunnel to {self.name}")
        with anyio.move_on_after(self.settings.connect_timeout):
            await self.session.run()


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
