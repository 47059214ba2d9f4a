"""Public ports: accept a client, decide whether it may in, and join it to a new stream.

A refused client is closed at once with a TCP RST, counted by `Refusal` (whose values are the
`atlax_connections_refused_total` labels) and logged at a limited rate. An admitted one becomes
a stream of its agent's tunnel and from then on lives in socket callbacks, with no task. On a
port shared by hostname, `routing.py` first reads which service the client wants.

At a service's, an agent's or the relay's connection limit, the connection idle the longest in
that scope makes room for the newcomer (`atlax_connections_evicted_total`); only if none has
been idle a moment is the newcomer refused.

A client whose agent has no tunnel on this instance (yet: the instance just started, or the
agent is still reaching every instance) is held for up to `agent_wait` seconds, unread, and
joined as soon as a tunnel arrives; held clients count against the port's and the source's
limits like open ones, and only they have a task of their own.

An instance of several (cluster size > 1) listens on a TCP port only once one of its agents has
a tunnel to it, or `LISTEN_GRACE` after the port was opened if none comes: until then the load
balancer (or, for workers, the kernel) sends the port's clients to instances that have one; a
single relay listens at once, as always.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import anyio
import anyio.abc

from ..config import RelaySettings
from ..idle import IdleClock, IdleOrder
from ..logs import RateLimitedLog, describe
from ..mux import DatagramFlow, MuxStream, StreamObserver, TunnelClosedError
from ..net import (
    accept_queued_then_close,
    accept_sockets,
    close_with_reset,
    origin_of,
    set_keepalive,
    start_listening,
)
from ..protocol import Origin
from .instance import Instance
from .observer import RelayObserver
from .policy import Eviction, Refusal, limits, make_room, refusal
from .registry import AgentState, PortBinding, PublicPort

log = logging.getLogger("atlax.relay")

LISTEN_GRACE = 10.0


class PublicPorts:
    """Serves the registry's public ports; `serve` is the registry's `serve_port`."""

    def __init__(
        self,
        settings: RelaySettings,
        observer: RelayObserver,
        clock: IdleClock,
        instance: Instance | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer
        self.instance = instance or Instance()
        self.task_group: anyio.abc.TaskGroup | None = None  # the relay's, set while it serves
        self.clock = clock  # of the idle orders; the relay advances it every second
        self.everyone: IdleOrder[PublicConnection] = IdleOrder(clock)
        self._refusals = RateLimitedLog(log)
        self._held: dict[int, int] = {}  # clients waiting for their agent's tunnel, per binding
        from .routing import Router  # routing.py builds on this module's join

        self._router = Router(self)

    def serve(self, public: PublicPort) -> None:
        """Start serving a newly opened port (until `public.close()`)."""
        assert self.task_group is not None, "ports are opened only while the relay serves"
        if public.key.protocol == "udp":
            from .udp import UdpPort  # udp.py builds on this module, as routing.py does

            self.task_group.start_soon(UdpPort(self, public).serve)
            return
        deferred = self.instance.size > 1 and not _any_usable(public)
        if not deferred:
            self._listen(public)
        self.task_group.start_soon(self._accept, public, deferred)

    def _listen(self, public: PublicPort) -> None:
        for sock in public.listeners:
            try:
                start_listening(sock)
            except OSError as exc:
                log.error("port %s: cannot listen: %s", public.text, describe(exc))

    async def stop_accepting(self, public: PublicPort) -> None:
        """No new clients (the relay drains): the ones already queued are still served."""
        if public.key.protocol != "tcp":
            # Its socket closes, so its flows could neither receive nor answer: they end now
            # (the UDP port's serve closes them), and the drain does not wait them out.
            public.scope.cancel()
            public.stop_listening()
            return

        async def handle(client: socket.socket) -> None:
            await self._handle(public, client)

        for sock in public.listeners:
            await accept_queued_then_close(sock, handle)

    async def _handle(self, public: PublicPort, client: socket.socket) -> None:
        if public.route is None:
            await self._join(public.bindings[0], client)
        else:
            await self._router.take(public, client)

    async def _accept(self, public: PublicPort, deferred: bool) -> None:
        async def handle(client: socket.socket) -> None:
            await self._handle(public, client)

        try:
            with public.scope:
                if deferred:
                    with anyio.move_on_after(LISTEN_GRACE):
                        while not _any_usable(public):
                            await _next_move(public)
                    self._listen(public)
                async with anyio.create_task_group() as tg:
                    for sock in public.listeners:
                        tg.start_soon(accept_sockets, sock, handle)
        finally:
            public.stop_listening()

    def refuse(
        self, port: int, origin: Origin | None, reason: Refusal, detail: str | None = None
    ) -> None:
        """Count and log (at a limited rate) a client closed before it reached an agent."""
        self.observer.connection_refused(port, reason)
        where = f"{origin.source}:{origin.source_port}" if origin else "unknown peer"
        self._refusals.warning(
            f"{port}/{reason}",
            "port %d: closed connection from %s: %s",
            port,
            where,
            detail or reason.text,
        )

    def admit(self, binding: PortBinding, origin: Origin | None) -> Refusal | None:
        """The refusal policy, then the connection limits, making room at a full one by
        closing the connection idle the longest there. Why the newcomer is refused, or None."""
        return refusal(binding, origin, self.settings) or make_room(
            limits(binding, self.settings, self.everyone), self._evict
        )

    def account(
        self, binding: PortBinding, stream: MuxStream | DatagramFlow, source: Any
    ) -> PublicConnection:
        """The observer that counts an admitted connection (or UDP flow) in and out."""
        return PublicConnection(
            self.observer, binding, stream, source, self.everyone, self._refusals
        )

    def _evict(self, victim: PublicConnection, idle: int, reason: Refusal) -> None:
        port = victim.port
        self.observer.connection_evicted(port, Eviction.IDLE)
        self._refusals.warning(
            f"{port}/evicted",
            "port %d: closed a connection idle for %ds to make room: %s",
            port,
            idle,
            reason.text,
        )
        victim.abort()

    def open_stream(self, binding: PortBinding, origin: Origin | None) -> MuxStream | None:
        """A new stream for a client the policy admits; None if refused (counted) or if the
        tunnel just closed."""
        reason = self.admit(binding, origin)
        if reason is not None:
            self.refuse(binding.service.port, origin, reason)
            return None
        service, state = binding.service, binding.state
        assert state.session is not None
        try:
            proxy = 2 if service.proxy_protocol == "v2" else None
            stream = state.session.open_stream_now(service.name, origin, proxy)
        except TunnelClosedError:
            return None
        source = origin.source if origin is not None else None
        stream.observer = self.account(binding, stream, source)
        return stream

    async def _join(self, binding: PortBinding, client: socket.socket) -> None:
        """Join a public connection to a new stream; from then on it lives in callbacks. A
        client whose agent has no tunnel here yet waits for one (up to `agent_wait`)."""
        origin = origin_of(client)
        wait = self.settings.agent_wait > 0
        if wait and refusal(binding, origin, self.settings) is Refusal.AGENT_OFFLINE:
            reason = self._hold_refusal(binding, origin)
            if reason is None:
                assert self.task_group is not None
                self.task_group.start_soon(self._held_join, binding, client, origin)
                return
            self.refuse(binding.service.port, origin, reason)
            close_with_reset(client)
            return
        await self._join_now(binding, client, origin)

    def _hold_refusal(self, binding: PortBinding, origin: Origin | None) -> Refusal | None:
        """Whether a client may wait for its agent: the port's and the source's limits count
        the clients already waiting too."""
        service = binding.service
        waiting = self._held.get(id(binding), 0)
        limit = service.max_connections or self.settings.max_connections_per_port
        if binding.connections + waiting >= limit:
            return Refusal.PORT_LIMIT
        if origin is not None:
            open_here = binding.by_source.get(origin.source, 0)
            if open_here + waiting >= self.settings.max_connections_per_source:
                # The per-source count of waiting clients is not kept: count them all against
                # the source (strict, and waiting is short).
                return Refusal.SOURCE_LIMIT
        return None

    async def _held_join(
        self, binding: PortBinding, client: socket.socket, origin: Origin | None
    ) -> None:
        """Wait (up to `agent_wait`) for the agent's tunnel, then join or refuse the client."""
        key = id(binding)
        self._held[key] = self._held.get(key, 0) + 1
        served = False
        try:
            state = binding.state
            with anyio.move_on_after(self.settings.agent_wait):
                while not binding.closed and not state.usable:
                    await state.next_move()
            if binding.closed:
                client.close()
                return
            served = refusal(binding, origin, self.settings) is None
            await self._join_now(binding, client, origin)
        except BaseException:
            client.close()
            raise
        finally:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]
            self.observer.connection_waited(binding.service.port, served)

    async def _join_now(
        self, binding: PortBinding, client: socket.socket, origin: Origin | None
    ) -> None:
        stream = self.open_stream(binding, origin)
        if stream is None:
            close_with_reset(client)
            return
        set_keepalive(client)  # clients that vanish without FIN or RST are reaped
        session = binding.state.session
        assert session is not None
        await session.join(stream, client)  # at once, or when a full tunnel has drained


class PublicConnection(StreamObserver):
    """Accounting for one public connection (or UDP flow), counted in here and counted out in
    `closed`: bytes, the agent's stream counters, the port's connections per source, and its
    place in the idle orders of its service's port, its agent and the relay (reordered at most
    once a second, on the coarse clock of those orders)."""

    __slots__ = (
        "_active",
        "_binding",
        "_bytes",
        "_clock",
        "_log",
        "_observer",
        "_orders",
        "_service",
        "_source",
        "_state",
        "_stream",
    )

    def __init__(
        self,
        observer: RelayObserver,
        binding: PortBinding,
        stream: MuxStream | DatagramFlow,
        source: Any,
        everyone: IdleOrder[PublicConnection],
        rate_limited: RateLimitedLog,
    ) -> None:
        state = binding.state
        self._observer = observer
        self._binding = binding
        self._state = state
        self._stream = stream
        self._source = source
        self._log = rate_limited
        self._clock = everyone.clock
        self._active = self._clock.now
        self._orders = (binding.idle, state.idle, everyone)
        self._service = binding.service.name
        self._bytes = observer.stream_opened(state.name, self._service)
        state.streams_total += 1
        binding.connections += 1
        binding.by_source[source] = binding.by_source.get(source, 0) + 1
        for order in self._orders:
            order.add(self)

    @property
    def port(self) -> int:
        return self._binding.service.port

    def sent(self, n: int) -> None:
        self._state.bytes_to_agent += n
        self._bytes.to_agent += n
        if self._active != self._clock.now:
            self._touch()

    def received(self, n: int) -> None:
        self._state.bytes_from_agent += n
        self._bytes.from_agent += n
        if self._active != self._clock.now:
            self._touch()

    def _touch(self) -> None:
        self._active = self._clock.now
        for order in self._orders:
            order.touch(self)

    def abort(self) -> None:
        """Close it now: RST to the client (for TCP), RESET to the agent."""
        self._stream.abort()

    def evicted(self) -> None:
        """The relay holds more than max_buffered_bytes: this one's client read slowest."""
        port = self.port
        self._observer.connection_evicted(port, Eviction.BUFFER_BUDGET)
        self._log.warning(
            "budget",
            "port %d: closed a connection whose client took no byte for the longest: the relay "
            "holds max_buffered_bytes for slow readers",
            port,
        )

    def closed(self, ok: bool) -> None:
        binding = self._binding
        binding.connections -= 1
        for order in self._orders:
            order.discard(self)
        left = binding.by_source[self._source] - 1
        if left:
            binding.by_source[self._source] = left
        else:
            del binding.by_source[self._source]
        self._observer.stream_closed(self._state.name, self._service)


def _any_usable(public: PublicPort) -> bool:
    """One of the port's agents has a tunnel here that can carry a stream."""
    return any(binding.state.usable for binding in public.bindings)


async def _next_move(public: PublicPort) -> None:
    """Until a tunnel of one of the port's agents joins or leaves."""
    if not public.bindings:  # a port being closed: its scope ends the wait
        await anyio.sleep_forever()
    async with anyio.create_task_group() as tg:
        for binding in public.bindings:

            async def wait(state: AgentState = binding.state) -> None:
                await state.next_move()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)
