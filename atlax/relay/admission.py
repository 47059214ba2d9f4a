"""Agent admission: a connection on the agent port becomes a configured agent's tunnel, or not.

In order: the handshake caps (`max_handshakes_per_source` refuses the newcomer at once,
`max_handshakes` ends the oldest pending handshake to admit it), the mutual TLS handshake (within
`handshake_timeout`), the ALPN check, the identity check against the registry (the certificate's
Common Name must be a configured agent, its key among the agent's pins if it has any, the relay
not shutting down, `max_agents` not reached); only then is a tunnel session created and handed
the transport, inside the callback that reports the finished handshake, so that no SETTINGS
(which tell an agent its tunnel is up) leave before the certificate was accepted. The tunnel
carries streams once the agent's SETTINGS arrived, or, for a pool agent (cluster extension),
once it sent JOIN: a tunnel the agent closes as a duplicate (it holds one to this instance
already) never counts. A newer tunnel from the same identity replaces the older one, which gets
`drain_timeout` to finish its streams. A refusal after the handshake is a GOAWAY naming the
code and the reason; every refusal is counted by `HandshakeFailure` (the
`atlax_handshake_failures_total` labels) and logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Callable
from enum import StrEnum
from typing import cast

import anyio
import anyio.abc

from ..budget import BufferBudget
from ..config import RelaySettings
from ..handshakes import HandshakeGate, Verdict, source_of
from ..logs import RateLimitedLog, describe
from ..mux import MuxSession, MuxStream, TunnelClosedError
from ..net import close_with_reset, peer_address
from ..pins import PinError, pin_of_certificate
from ..protocol import (
    ALPN,
    Connection,
    ConnectionEnd,
    EndReason,
    ErrorCode,
    KeepaliveConfig,
    Role,
    Settings,
)
from ..tls import peer_common_name
from .instance import Instance
from .observer import RelayObserver
from .registry import AgentRegistry, AgentState

log = logging.getLogger("atlax.relay")

# A stream's window toward the relay starts here and doubles up to STREAM_WINDOW_MAX while its
# client keeps up (MuxStream._credit): a client that never reads holds only the start.
STREAM_WINDOW_START = 64 * 1024
STREAM_WINDOW_MAX = 1 << 20
# The relay opens streams and never accepts them from agents: MAX_STREAMS 0.
TUNNEL_SETTINGS = Settings(
    initial_window=STREAM_WINDOW_START, max_frame_size=256 * 1024, max_streams=0
)


class HandshakeFailure(StrEnum):
    """Why a connection on the agent port got no tunnel; the values are the metric labels."""

    TIMEOUT = "timeout"
    CERTIFICATE_REJECTED = "certificate_rejected"  # foreign CA, expired, ...
    NO_CERTIFICATE = "no_certificate"
    TLS_ERROR = "tls_error"
    CONNECTION_LOST = "connection_lost"
    ALPN = "alpn"
    UNKNOWN_IDENTITY = "unknown_identity"  # not configured, or revoked
    KEY_NOT_PINNED = "key_not_pinned"  # a key the agent's pins do not list
    AGENT_LIMIT = "agent_limit"  # max_agents reached
    SHUTTING_DOWN = "shutting_down"
    SOURCE_HANDSHAKE_LIMIT = "source_handshake_limit"  # reset at once: max_handshakes_per_source
    HANDSHAKE_EVICTED = "handshake_evicted"  # the oldest pending one, over max_handshakes

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
        self,
        settings: RelaySettings,
        registry: AgentRegistry,
        observer: RelayObserver,
        budget: BufferBudget[MuxStream] | None = None,
        instance: Instance | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.observer = observer
        self.budget = budget  # relay-wide, for bytes held for slow public clients
        self.instance = instance or Instance(workers=settings.workers, replicas=settings.replicas)
        self.instance.on_size = self.announce
        self.context: ssl.SSLContext | None = None  # the relay's, replaced when files change
        self.task_group: anyio.abc.TaskGroup | None = None  # the relay's, set while it serves
        self.shutting_down = False
        self.handshakes = HandshakeGate(settings.max_handshakes, settings.max_handshakes_per_source)
        self.handshakes_started = 0  # the heap trimmer counts them as a burst
        self._refusals = RateLimitedLog(log)
        self.tunnels: set[MuxSession] = set()  # every admitted tunnel: joined, not yet, replaced

    def tunnel_settings(self) -> Settings:
        """This instance's SETTINGS: who it is and how many instances it expects."""
        return dataclasses.replace(
            TUNNEL_SETTINGS, instance_id=self.instance.id, cluster_size=self.instance.size
        )

    def announce(self, size: int) -> None:
        """The cluster size changed: tell every pool agent's tunnel (CLUSTER)."""
        told = sum(1 for session in list(self.tunnels) if session.announce_cluster(size))
        log.info("cluster size is now %d; told %d pool tunnel(s)", size, told)

    async def admit(self, sock: socket.socket) -> None:
        """Admit a new connection on the agent port under the handshake caps (a task of its
        own from here), or reset it at once."""
        assert self.task_group is not None, "agents are admitted only while the relay serves"
        scope = anyio.CancelScope()
        admission = self.handshakes.admit(scope, source_of(_peer_ip(sock)))
        if admission.verdict is Verdict.REFUSED:
            self.observer.handshake_failed(HandshakeFailure.SOURCE_HANDSHAKE_LIMIT)
            self._refusals.warning(
                "source-handshakes",
                "agent port: reset a connection from %s: that source already has %d handshakes "
                "in progress (max_handshakes_per_source)",
                peer_address(sock),
                self.handshakes.per_source,
            )
            close_with_reset(sock)
            return
        if admission.evicted is not None:
            self.observer.handshake_failed(HandshakeFailure.HANDSHAKE_EVICTED)
            self._refusals.warning(
                "evicted-handshakes",
                "agent port: %d handshakes in progress (max_handshakes): ended the oldest to "
                "admit a new one",
                len(self.handshakes),
            )
            cast(anyio.CancelScope, admission.evicted).cancel()
        self.handshakes_started += 1
        self.task_group.start_soon(self._contained, sock, scope)

    async def _contained(self, sock: socket.socket, scope: anyio.CancelScope) -> None:
        gate = _Gate(self._decide, peer_address(sock))
        try:
            with scope:
                await self._handshake(sock, gate)
        except Exception:
            log.exception("internal error handling an agent connection; closed it")
        finally:
            self.handshakes.done(scope)
        tunnel = gate.tunnel
        if tunnel is None:
            sock.close()  # refused, failed, timed out or evicted: nothing else was created
            return
        await self._run(*tunnel)

    async def _handshake(self, sock: socket.socket, gate: _Gate) -> None:
        """TLS on the agent port; `gate` decides, once it is done, who is calling."""
        s = self.settings
        peer = gate.peer
        assert self.context is not None
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(s.handshake_timeout):
                await loop.connect_accepted_socket(
                    lambda: gate,
                    sock,
                    ssl=self.context,
                    ssl_handshake_timeout=s.handshake_timeout + 1,
                )
        except TimeoutError:
            self.observer.handshake_failed(HandshakeFailure.TIMEOUT)
            log.warning("agent port: TLS handshake from %s timed out", peer)
        except (ssl.SSLError, OSError, EOFError, ValueError) as exc:
            self.observer.handshake_failed(HandshakeFailure.of_tls_error(exc))
            reason = describe(exc, peer="client", during="during the handshake")
            log.warning("agent port: TLS handshake from %s failed: %s", peer, reason)

    def _decide(self, transport: asyncio.Transport, peer: str) -> _Tunnel | None:
        """The TLS handshake is done: check who it is, then hand the transport to a tunnel
        session, or refuse with GOAWAY. Synchronous, inside the transport's callback, so no
        byte reaches a session before this decision, and none is created for a refusal."""
        tls = transport.get_extra_info("ssl_object")
        name = peer_common_name(tls.getpeercert()) if tls is not None else None
        if tls is None or tls.selected_alpn_protocol() != ALPN:
            self._refuse(
                transport,
                name,
                peer,
                HandshakeFailure.ALPN,
                ErrorCode.PROTOCOL_ERROR,
                f"peer did not negotiate ALPN {ALPN}",
                goaway=f"ALPN {ALPN} required",
            )
            return None
        state = self.registry.get(name) if name else None
        pin = _peer_pin(tls)
        refusal = self._refusal(name, state, pin)
        if refusal is not None:
            self._refuse(transport, name, peer, *refusal)
            return None
        assert state is not None
        s = self.settings
        session = MuxSession(
            Role.SERVER,
            settings=self.tunnel_settings(),
            keepalive=KeepaliveConfig(s.keepalive_interval, s.keepalive_timeout),
            name=f"agent {state.name!r}",
            budget=self.budget,
            window_limit=STREAM_WINDOW_MAX,
        )
        transport.set_protocol(session)
        session.connection_made(transport)
        state.tunnels[session] = pin  # from now on a revoked pin closes it
        return state, session, peer, pin

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

    def _refuse(
        self,
        transport: asyncio.Transport,
        name: str | None,
        peer: str,
        failure: HandshakeFailure,
        code: ErrorCode,
        reason: str,
        goaway: str | None = None,
    ) -> None:
        """Count and log the refusal, then tell the agent why (SETTINGS and GOAWAY written
        straight to the transport: no session exists for it) and close."""
        self.observer.handshake_failed(failure)
        log.warning("agent port: refused %r from %s: %s", name, peer, reason)
        conn = Connection(Role.SERVER, TUNNEL_SETTINGS)
        conn.close(code, goaway or reason)
        transport.write(conn.data_to_send())
        transport.close()

    async def _run(
        self, state: AgentState, session: MuxSession, peer: str, pin: str | None
    ) -> None:
        """Serve the tunnel from its handshake to its end; it carries streams once accepted."""
        self.tunnels.add(session)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(session.run)
                if await self._accepted(state, session, peer, pin):
                    await self._serve(state, session, peer)
                else:
                    await session.wait_closed()
        finally:
            self.tunnels.discard(session)
            state.tunnels.pop(session, None)

    async def _accepted(
        self, state: AgentState, session: MuxSession, peer: str, pin: str | None
    ) -> bool:
        """Whether the tunnel is the agent's to use: SETTINGS arrived, and a pool agent's JOIN."""
        limit = self.settings.handshake_timeout
        try:
            with anyio.fail_after(limit):
                await session.wait_ready()
                if session.conn.awaiting_join:
                    await session.wait_joined()
        except TimeoutError:
            what = "JOIN" if session.ready else "SETTINGS"
            log.warning("agent %r from %s sent no %s within %gs", state.name, peer, what, limit)
            session.close(ErrorCode.PROTOCOL_ERROR, f"no {what} within {limit:g}s")
            return False
        except TunnelClosedError:
            settings = session.peer_settings
            if settings is not None and settings.tunnel_pool:  # the agent holds one here
                log.debug(
                    "agent %r: tunnel from %s closed before JOIN: %s", state.name, peer, session.end
                )
            else:
                log.info(
                    "agent %r: tunnel from %s ended before it was up: %s",
                    state.name,
                    peer,
                    session.end,
                )
            return False
        if self.registry.get(state.name) is not state:  # removed (revoked) meanwhile
            session.close(ErrorCode.UNAUTHORIZED, f"agent {state.name!r} was removed")
            return False
        unpinned = state.unpinned(pin)
        if unpinned is not None:  # its key was unpinned meanwhile
            session.close(ErrorCode.UNAUTHORIZED, unpinned)
            return False
        if self.shutting_down:
            session.close(ErrorCode.NO_ERROR, "relay shutting down")
            return False
        return True

    async def _serve(self, state: AgentState, session: MuxSession, peer: str) -> None:
        """The agent's accepted tunnel becomes current until it ends; an earlier one gets
        drain_timeout to finish its streams (REPLACED after that)."""
        agent = state.name
        observer = self.observer

        def record_rtt(rtt: float) -> None:
            observer.tunnel_rtt(agent, rtt)

        session.on_pong = record_rtt
        old = state.session
        if old is None:
            observer.agent_connected(agent)
        state.session = session
        state.peer = peer
        state.connected_since = time.time()
        state.tunnel_moved()
        if old is not None:
            log.info("agent %r connected from %s, replacing its earlier tunnel", agent, peer)
            old.close(ErrorCode.NO_ERROR, "replaced by a newer tunnel from the same identity")
            assert self.task_group is not None
            self.task_group.start_soon(_expire, old, self.settings.drain_timeout)
        else:
            log.info("agent %r connected from %s", agent, peer)
        try:
            await session.wait_closed()
        finally:
            end = session.end or ConnectionEnd(EndReason.CANCELLED)  # run() always sets it
            observer.tunnel_ended(agent, end)
            if state.session is session:
                state.session = None
                state.tunnel_moved()
                observer.agent_disconnected(agent)
                log.info("agent %r disconnected: %s", agent, end)


_Tunnel = tuple[AgentState, MuxSession, str, str | None]


class _Gate(asyncio.Protocol):
    """The agent port's protocol until the peer is known. When TLS completes, `decide` hands
    the transport to a tunnel session (or refuses it) inside `connection_made`; before that,
    a connection holds nothing but its TLS state."""

    def __init__(self, decide: Callable[[asyncio.Transport, str], _Tunnel | None], peer: str):
        self._decide = decide
        self.peer = peer
        self.tunnel: _Tunnel | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tunnel = self._decide(cast(asyncio.Transport, transport), self.peer)

    def data_received(self, data: bytes) -> None:
        pass  # a refused peer's bytes, until the close: ignored

    def eof_received(self) -> bool:
        return False


def _peer_ip(sock: socket.socket) -> str | None:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError):
        return None


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
