"""The relay: serve the agent port and the public ports, reload TLS files, shut down gracefully.

`Relay` wires the rooms together: the registry (agents and port bindings), the public ports,
agent admission. It reports what happens to a `RelayObserver` and imports nothing above
itself: the metrics port and the control socket are added by `atlax.relay_main`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

import anyio
import anyio.abc

from .. import heap
from ..budget import BufferBudget
from ..config import AgentSpec, RelaySettings
from ..idle import IdleClock
from ..mux import MuxStream
from ..net import accept_sockets, close_listener, format_address, listen_sockets, local_address
from ..protocol import ErrorCode
from ..tls import TLSConfigError, file_fingerprint, relay_context
from .admission import Admission
from .instance import Instance
from .observer import RelayObserver
from .ports import PublicPorts
from .registry import AgentRegistry

log = logging.getLogger("atlax.relay")

TLS_CHECK_INTERVAL = 30.0
# Heap a TLS handshake grows, as the heap trimmer counts it (asyncio's and uvloop's TLS
# protocols allocate a 256 KiB read buffer per connection), and how much makes a burst.
HANDSHAKE_HEAP_WEIGHT = 256 * 1024
HANDSHAKE_BURST = 16 << 20


class Relay:
    """The agent port, the public ports and the registry of one relay.

    `settings.metrics` and `settings.control_socket` are not served here: `RelayMain` adds
    them (a bare `Relay` is what tests and the demo run, with `observer=RelayMetrics()` when
    they want the counts).
    """

    def __init__(
        self,
        settings: RelaySettings,
        agents: Iterable[AgentSpec] = (),
        *,
        observer: RelayObserver | None = None,
        tls_wait: float = 0.0,
        tls_check_interval: float = TLS_CHECK_INTERVAL,
        instance: Instance | None = None,
        reuse_port: bool = False,
        listen_after_sync: bool | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer or RelayObserver()
        self.tls_wait = tls_wait
        self.tls_check_interval = tls_check_interval
        # With a control socket the state comes from a client, who says when it is all there.
        self.instance = instance or Instance(
            workers=settings.workers,
            replicas=settings.replicas,
            synced=settings.control_socket is None,
        )
        self.reuse_port = reuse_port  # a worker: every port shared with the other workers
        # No agents before the state is there (a worker; a relay with a control socket that is
        # one of several): one that reached the instance earlier would be refused as unknown and
        # back off, where a refused connect is retried within a second. A lone relay takes agents
        # at once, as it always did: whoever drives its control socket (curl, relayctl) need not
        # know about PUT /cluster, and there is no other instance to serve meanwhile.
        if listen_after_sync is None:
            listen_after_sync = settings.control_socket is not None and self.instance.size > 1
        self.listen_after_sync = listen_after_sync
        self.clock = IdleClock()  # of the idle orders: advanced every second while serving
        self.ports = PublicPorts(settings, self.observer, self.clock, self.instance)
        self.registry = AgentRegistry(
            settings.public_host,
            self.ports.serve,
            self.clock,
            instance=self.instance.name,
            reuse_port=reuse_port,
        )
        self.budget: BufferBudget[MuxStream] = BufferBudget(settings.max_buffered_bytes, self.clock)
        self.admission = Admission(
            settings, self.registry, self.observer, self.budget, self.instance
        )
        self._initial = tuple(agents)
        self._tg: anyio.abc.TaskGroup | None = None
        self._listeners: list[socket.socket] = []
        self.listen_addresses: list[tuple[str, int]] = []
        self.ready = anyio.Event()

    @property
    def shutting_down(self) -> bool:
        return self.admission.shutting_down

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        await self._wait_for_tls_files()
        self.admission.context = relay_context(s.ca, s.cert, s.key)
        if not self.listen_after_sync:
            await self._listen()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = self.ports.task_group = self.admission.task_group = tg
                for spec in self._initial:
                    await self.registry.apply_agent(spec)
                if self.listen_after_sync:
                    tg.start_soon(self._listen_when_synced)
                else:
                    self._accept_agents()
                tg.start_soon(self._watch_tls_files)
                tg.start_soon(self._trim_heap_after_bursts)
                tg.start_soon(self._tick)
                self.ready.set()
                task_status.started()
        finally:
            for sock in self._listeners:
                close_listener(sock)

    async def _listen(self) -> None:
        s = self.settings
        self._listeners = await listen_sockets(
            s.listen.host, s.listen.port, reuse_port=self.reuse_port
        )
        self.listen_addresses = [local_address(sock) for sock in self._listeners]

    def _accept_agents(self) -> None:
        assert self._tg is not None
        addresses = ", ".join(format_address(a) for a in self.listen_addresses)
        log.info("relay instance %s listening for agents on %s", self.instance.name, addresses)
        for sock in self._listeners:
            self._tg.start_soon(accept_sockets, sock, self.admission.admit)

    async def _listen_when_synced(self) -> None:
        """A worker joins the agent port's listeners only once it knows its agents: an agent
        that reached it earlier would be refused as unknown."""
        await self.instance.synced_event.wait()
        if not self.shutting_down:
            await self._listen()
            self._accept_agents()

    def readiness(self) -> tuple[bool, str]:
        """Whether the relay takes agents and clients, and if not, why."""
        if self.shutting_down:
            return False, "shutting down"
        if not self.ready.is_set():
            return False, "starting"
        if not self.instance.synced:
            # One of several instances is not ready before its state is applied: the others
            # serve meanwhile. A lone relay has no one to leave the traffic to; it says ready (its
            # probe does not fail while it starts).
            if self.instance.size > 1:
                return False, "waiting for its control state"
            if self.listen_after_sync:
                return True, "waiting for its control state before it takes agents"
        return True, "listening"

    async def _wait_for_tls_files(self) -> None:
        """In a pod, the operator writes the relay's certificate shortly after start: wait."""
        s = self.settings
        deadline = anyio.current_time() + self.tls_wait
        missing = [p for p in (s.ca, s.cert, s.key) if not p.exists()]
        if missing and self.tls_wait > 0:
            log.info("waiting up to %gs for %s", self.tls_wait, ", ".join(map(str, missing)))
        while missing and anyio.current_time() < deadline:
            await anyio.sleep(0.5)
            missing = [p for p in (s.ca, s.cert, s.key) if not p.exists()]

    async def _watch_tls_files(self) -> None:
        """Reload the certificate and CA when they change on disk (renewal, cert-manager)."""
        s = self.settings
        seen = file_fingerprint(s.ca, s.cert, s.key)
        while True:
            await anyio.sleep(self.tls_check_interval)
            current = file_fingerprint(s.ca, s.cert, s.key)
            if current == seen:
                continue
            try:
                self.admission.context = relay_context(s.ca, s.cert, s.key)
            except TLSConfigError as exc:
                log.warning("certificate files changed but cannot be used yet: %s", exc)
                continue
            seen = current
            log.info("reloaded the relay certificate and CA from disk")

    async def _tick(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self.clock.advance()

    async def _trim_heap_after_bursts(self) -> None:
        """Give the heap back after a burst of traffic, or of TLS handshakes (each allocates
        a TLS read buffer; a flood of them would leave its peak behind)."""
        traffic = heap.HeapTrimmer(self.registry.bytes_moved)
        handshakes = heap.HeapTrimmer(
            lambda: self.admission.handshakes_started * HANDSHAKE_HEAP_WEIGHT,
            burst=HANDSHAKE_BURST,
        )
        while traffic.available:
            await anyio.sleep(heap.INTERVAL)
            if not traffic.tick():
                handshakes.tick()

    async def shutdown(self, grace: float | None = None) -> None:
        """GOAWAY to every agent, stop accepting, let open streams finish within `grace`."""
        if self.shutting_down:
            return
        self.admission.shutting_down = True
        grace = self.settings.drain_timeout if grace is None else grace
        log.info("relay shutting down: draining streams for up to %gs", grace)
        for sock in self._listeners:
            close_listener(sock)
        for public in self.registry.ports():
            await self.ports.stop_accepting(public)  # queued clients in; open ones run on
        sessions = list(self.admission.tunnels)  # joined, not yet joined, being replaced
        for session in sessions:
            session.close(ErrorCode.NO_ERROR, "relay shutting down")
        with anyio.move_on_after(grace):
            for session in sessions:
                await session.wait_closed()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
