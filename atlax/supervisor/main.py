"""What `atlax relay --workers N` runs (N > 1): a supervisor of N relay worker processes.

The supervisor runs no tunnel. Its workers share the agent port and every public port
(SO_REUSEPORT); it owns the configured control socket and metrics address: a change reaches every
worker (`FanOutRegistry`), a read merges theirs, /metrics sums their expositions. Each worker has a
private control socket in a directory of mode 0700 that only this user reaches. A worker that dies
is started again (`WorkerSet`) and given the whole desired state before it listens for agents.
SIGTERM reaches every worker, which drains; the supervisor exits once all have.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketListener
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..config import RelayConfig
from ..control.client import ControlClient, ControlSocketError
from ..control.server import ControlServer
from ..metrics import MetricsServer
from ..net import format_address, listen_sockets, local_address
from ..relay_main import WorkerSpec
from .fanout import FanOutRegistry
from .metrics import merge_expositions
from .workers import Worker, WorkerSet

log = logging.getLogger("atlax.supervisor")

SCRAPE_TIMEOUT = 5.0


class SupervisorCluster:
    """The control API's `/cluster` for a supervisor: its workers are the instances."""

    def __init__(self, supervisor: Supervisor, replicas: int, synced: bool) -> None:
        self.supervisor = supervisor
        self.replicas = replicas
        self.synced_event = anyio.Event()
        if synced:
            self.synced_event.set()

    @property
    def synced(self) -> bool:
        return self.synced_event.is_set()

    def body(self) -> dict[str, Any]:
        """What a worker is told with PUT /cluster."""
        return {"replicas": self.replicas}

    def snapshot(self) -> dict[str, Any]:
        workers = self.supervisor.workers.workers
        return {
            "instance": None,
            "instances": [f"{w.instance:08x}" for w in workers if w.ready],
            "workers": len(workers),
            "replicas": self.replicas,
            "size": len(workers) * self.replicas,
            "synced": self.synced,
        }

    async def set_cluster(self, replicas: int) -> dict[str, Any]:
        self.replicas = replicas
        self.synced_event.set()
        await self.supervisor.fanout.set_cluster(self.body())
        return self.snapshot()


class Supervisor:
    def __init__(
        self,
        config: RelayConfig,
        config_path: Path,
        workers: int,
        *,
        tls_wait: float = 0.0,
        log_level: str = "info",
    ) -> None:
        s = self.settings = config.relay.model_copy(update={"workers": workers})
        self.config_path = config_path
        self.tls_wait = tls_wait
        self.log_level = log_level
        self.runtime = Path(tempfile.mkdtemp(prefix="atlax-relay-"))  # mode 0700
        self.fanout = FanOutRegistry(self._clients, config.agents)
        self.cluster = SupervisorCluster(self, s.replicas, synced=s.control_socket is None)
        self.workers = WorkerSet(
            workers,
            self.runtime,
            self._command,
            self._sync,
            sync_timeout=tls_wait + 30.0,
        )
        self.control: ControlServer | None = None
        self.listen_port = s.listen.port
        self._reserved: list[socket.socket] = []
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        try:
            await self._reserve_agent_port()
            async with anyio.create_task_group() as tg:
                if s.metrics is not None:
                    socks = await listen_sockets(s.metrics.host, s.metrics.port)
                    listeners = [await SocketListener.from_socket(sock) for sock in socks]
                    server = MetricsServer(self.exposition, self.readiness)
                    await tg.start(server.serve, listeners)
                    log.info("metrics and health on %s", format_address(local_address(socks[0])))
                if s.control_socket is not None:
                    control = ControlServer(self.fanout, s.control_socket, cluster=self.cluster)
                    await tg.start(control.serve)
                    self.control = control
                log.info(
                    "supervising %d relay workers on agent port %s:%d",
                    len(self.workers.workers),
                    s.listen.host,
                    self.listen_port,
                )
                await tg.start(self.workers.run)
                task_status.started()
        finally:
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(self.runtime, ignore_errors=True)

    async def shutdown(self) -> bool:
        """Every worker drains; True if all were done within their drain timeout (+10 s)."""
        self._stopping = True
        log.info("stopping %d relay workers: each drains its streams", len(self.workers.workers))
        return await self.workers.stop(kill_after=self.settings.drain_timeout + 10.0)

    def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if not self.cluster.synced:
            return False, "waiting for its control state"
        if not self.workers.ready():
            return False, "no worker ready"
        return True, f"{len(self.workers.ready())} of {len(self.workers.workers)} workers ready"

    # -- workers -----------------------------------------------------------------------------

    async def _reserve_agent_port(self) -> None:
        """Take the agent port now and keep it (bound, not listening, SO_REUSEPORT) so that
        every worker, restarted ones too, shares it: port 0 picks one, and a port another
        process holds is an error here, not workers that fail and are restarted forever."""
        s = self.settings
        self._reserved = await listen_sockets(
            s.listen.host, s.listen.port, reuse_port=True, listen=False
        )
        self.listen_port = local_address(self._reserved[0])[1]

    def _command(self, worker: Worker) -> list[str]:
        spec = WorkerSpec(
            worker.index,
            worker.instance,
            worker.control,
            self.listen_port,
            workers=len(self.workers.workers),
            supervisor=os.getpid(),
        )
        return [
            sys.executable,
            "-m",
            "atlax.cli",
            "--log-level",
            self.log_level,
            "relay",
            "--config",
            str(self.config_path),
            "--wait-for-tls",
            str(self.tls_wait),
            "--worker",
            spec.to_json(),
        ]

    async def _sync(self, worker: Worker) -> None:
        client = ControlClient(worker.control, timeout=5.0)
        while True:  # until its control socket answers (WorkerSet bounds the wait)
            try:
                await client.health()
                break
            except ControlSocketError:
                await anyio.sleep(0.05)
        cluster = self.cluster.body() if self.cluster.synced else None
        await self.fanout.sync(client, cluster)

    def _clients(self) -> list[ControlClient]:
        return [ControlClient(w.control, timeout=10.0) for w in self.workers.ready()]

    # -- metrics -----------------------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The workers' metrics summed, with the supervisor's own."""
        texts: list[str] = []

        async def scrape(client: ControlClient) -> None:
            try:
                with anyio.fail_after(SCRAPE_TIMEOUT):
                    status, body = await client.call_raw("GET", "/metrics")
            except (ControlSocketError, TimeoutError) as exc:
                log.warning("could not scrape %s: %s", client.path, exc)
                return
            if status == 200:
                texts.append(body.decode())

        async with anyio.create_task_group() as tg:
            for client in self._clients():
                tg.start_soon(scrape, client)
        agents = await self.fanout.agents()
        override: dict[str, Metric] = {
            "atlax_agents_connected": GaugeMetricFamily(
                "atlax_agents_connected",
                "Agents with a live tunnel (to at least one worker).",
                value=sum(1 for a in agents if a["connected"]),
            ),
            "atlax_tunnels_connected": GaugeMetricFamily(
                "atlax_tunnels_connected",
                "Agent tunnels joined, all workers together.",
                value=sum(len(a.get("instances", [])) for a in agents),
            ),
            "atlax_relay_workers": GaugeMetricFamily(
                "atlax_relay_workers", "Relay workers ready.", value=len(self.workers.ready())
            ),
            "atlax_worker_restarts": CounterMetricFamily(
                "atlax_worker_restarts",
                "Relay workers started again after they exited.",
                value=self.workers.restarts_total,
            ),
        }
        return merge_expositions(texts, override)
