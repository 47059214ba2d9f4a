"""Agent admission: a connection on the agent port becomes a configured agent's tunnel, or not.

In order: the mutual TLS handshake (within `handshake_timeout`), the ALPN check, the identity
check against the registry (the certificate's Common Name must be a configured agent, the relay
not shutting down, `max_agents` not reached), then the tunnel runs; a newer tunnel from the same
identity replaces the older one, which gets `drain_timeout` to finish its streams. A refusal
after the handshake is a GOAWAY naming the code and the reason; every refusal is counted by
`HandshakeFailure` (the `atlax_handshake_failures_total` labels) and logged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from enum import StrEnum

import anyio
import anyio.abc

from ..config import RelaySettings
from ..logs import describe
from ..mux import MuxSession
from ..net import peer_address
from ..pins import PinError, pin_of_certificate
from ..protocol import ALPN, ConnectionEnd, EndReason, ErrorCode, KeepaliveConfig, Role, Settings
from ..tls import peer_common_name
from .observer import RelayObserver
from .registry import AgentRegistry, AgentState

log = logging.getLogger("atlax.relay")

# The relay opens streams and never accepts them from agents: MAX_STREAMS 0.
TUNNEL_SETTINGS = Settings(initial_window=1 << 20, max_frame_size=256 * 1024, max_streams=0)


class HandshakeFailure(StrEnum):
    """Why a connection on the agent port got no tunnel; the values are the metric labels."""

    TIMEOUT = "timeout"
    CERTIFICATE_REJECTED = "certificate_rejected"  # foreign CA, expired, ...
    NO_CERTIFICATE = "no_certificate"
    TLS_ERROR = "tls_error"
    CONNECTION_LOST = "connection_lost"
    ALPN = "alpn"
    UNKNOWN_IDENTITY = "unknown_identity"  # not configured, or revoked
    AGENT_LIMIT = "agent_limit"  # max_agents reached
    SHUTTING_DOWN = "shutting_down"
    KEY_NOT_PINNED = "key_not_pinned"  # a key the agent's pins do not list

    @classmethod
    def of_tls_error(cls, exc: BaseException) -> HandshakeFailure:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return cls.CERTIFICATE_REJECTED
        if (
            isinstance(exc, ssl.SSLError)
            and "CERTIFICATE" in (getattr(exc, "reason", None) or "").upper()
        ):
            return cls.NO_CERTIFICATE
        if isinstance(exc, ssl.SSLError):
            return cls.TLS_ERROR
        return cls.CONNECTION_LOST


class Admission:
    """Admits agents; `admit` is the agent port's accept handler."""

    def __init__(
        self, settings: RelaySettings, registry: AgentRegistry, observer: RelayObserver
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.observer = observer
        self.context: ssl.SSLContext | None = None  # the relay's, replaced when files change
        self.task_group: anyio.abc.TaskGroup | None = None  # the relay's, set while it serves
        self.shutting_down = False

    async def admit(self, sock: socket.socket) -> None:
        """Hand a new connection on the agent port to a task of its own."""
        assert self.task_group is not None, "agents are admitted only while the relay serves"
        self.task_group.start_soon(self._contained, sock)

    async def _contained(self, sock: socket.socket) -> None:
        try:
            await self._admit(sock)
        except Exception:
            log.exception("internal error handling an agent connection; closed it")
            sock.close()

    async def _admit(self, sock: socket.socket) -> None:
        peer = peer_address(sock)
        s = self.settings
        assert self.context is not None
        session = MuxSession(
            Role.SERVER,
            settings=TUNNEL_SETTINGS,
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            name=f"agent at {peer}",
        )
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(s.handshake_timeout):
                transport, _ = await loop.connect_accepted_socket(
                    lambda: session,
                    sock,
                    ssl=self.context,
                    ssl_handshake_timeout=s.handshake_timeout + 1,
                )
        except TimeoutError:
            self.observer.handshake_failed(HandshakeFailure.TIMEOUT)
            log.warning("agent port: TLS handshake from %s timed out", peer)
            sock.close()
            return
        except (ssl.SSLError, OSError, EOFError, ValueError) as exc:
            self.observer.handshake_failed(HandshakeFailure.of_tls_error(exc))
            reason = describe(exc, peer="client", during="during the handshake")
            log.warning("agent port: TLS handshake from %s failed: %s", peer, reason)
            sock.close()
            return
        tls = transport.get_extra_info("ssl_object")
        name = peer_common_name(tls.getpeercert()) if tls is not None else None
        if tls is None or tls.selected_alpn_protocol() != ALPN:
            await self._refuse(
                session,
                name,
                peer,
                HandshakeFailure.ALPN,
                ErrorCode.PROTOCOL_ERROR,
                f"peer did not negotiate ALPN {ALPN}",
                goaway=f"ALPN {ALPN} required",
            )
            return
        state = self.registry.get(name) if name else None
        pin = _peer_pin(tls)
        refusal = self._refusal(name, state, pin)
        if refusal is not None:
            await self._refuse(session, name, peer, *refusal)
            return
        assert state is not None
        session.name = f"agent {state.name!r}"
        await self._run(state, session, peer, pin)

    def _refusal(
        self, name: str | None, state: AgentState | None, pin: str | None
    ) -> tuple[HandshakeFailure, ErrorCode, str] | None:
        """Why an agent with a good certificate gets no tunnel, or None to admit it."""
        if self.shutting_down:
            return HandshakeFailure.SHUTTING_DOWN, ErrorCode.UNAUTHORIZED, "relay shutting down"
        if state is None:
            return (
                HandshakeFailure.UNKNOWN_IDENTITY,
                ErrorCode.UNAUTHORIZED,
                f"identity {name!r} is not configured",
            )
        unpinned = state.unpinned(pin)
        if unpinned is not None:
            return HandshakeFailure.KEY_NOT_PINNED, ErrorCode.UNAUTHORIZED, unpinned
        limit = self.settings.max_agents
        if state.session is None and self.registry.connected() >= limit:
            return (
                HandshakeFailure.AGENT_LIMIT,
                ErrorCode.ENHANCE_YOUR_CALM,
                f"relay already serves its limit of {limit} agents",
            )
        return None

    async def _refuse(
        self,
        session: MuxSession,
        name: str | None,
        peer: str,
        failure: HandshakeFailure,
        code: ErrorCode,
        reason: str,
        goaway: str | None = None,
    ) -> None:
        """Count and log the refusal, then tell the agent why in a GOAWAY and close."""
        self.observer.handshake_failed(failure)
        log.warning("agent port: refused %r from %s: %s", name, peer, reason)
        session.close(code, goaway or reason)
        await session.run()

    async def _run(
        self, state: AgentState, session: MuxSession, peer: str, pin: str | None
    ) -> None:
        agent = state.name
        observer = self.observer

        def record_rtt(rtt: float) -> None:
            observer.tunnel_rtt(agent, rtt)

        session.on_pong = record_rtt
        old = state.session
        if old is None:
            observer.agent_connected(agent)
        state.session = session
        state.tunnels[session] = pin
        state.peer = peer
        state.connected_since = time.time()
        if old is not None:
            log.info("agent %r connected from %s, replacing its earlier tunnel", agent, peer)
            old.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel from the same identity")
            assert self.task_group is not None
            self.task_group.start_soon(_expire, old, self.settings.drain_timeout)
        else:
            log.info("agent %r connected from %s", agent, peer)
        try:
            await session.run()
        finally:
            state.tunnels.pop(session, None)
            end = session.end or ConnectionEnd(EndReason.CANCELLED)  # run() always sets it
            observer.tunnel_ended(agent, end)
            if state.session is session:
                state.session = None
                observer.agent_disconnected(agent)
                log.info("agent %r disconnected: %s", agent, end)


def _peer_pin(tls: ssl.SSLObject) -> str | None:
    """The key pin of the verified peer certificate (None if its DER cannot be read, which
    OpenSSL's verification makes unexpected)."""
    try:
        return pin_of_certificate(tls.getpeercert(binary_form=True) or b"")
    except PinError:
        return None


async def _expire(session: MuxSession, grace: float) -> None:
    """A replaced tunnel gets `grace` seconds to finish its streams, then is cut."""
    with anyio.move_on_after(grace):
        await session.wait_closed()
        return
    session.close(ErrorCode.REPLACED, "replaced by a newer tunnel")
