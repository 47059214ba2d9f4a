"""What `atlax relay` runs: the relay, its metrics and health port, and its control socket.

This is the one place that knows all three. The relay reports to its observer and never imports
the layers above it; here the observer is the Prometheus metrics, the metrics server asks this
assembly whether it is ready, and the control server is given the relay's registry.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
from anyio.abc import SocketListener

from .config import AgentSpec, RelaySettings
from .control.server import ControlServer
from .metrics import MetricsServer, RelayMetrics
from .net import format_address, listen_sockets, local_address
from .relay import Instance, Relay
from .relay.server import TLS_CHECK_INTERVAL

log = logging.getLogger("atlax.relay")


@dataclass(frozen=True)
class WorkerSpec:
    """What a supervisor tells a worker (`atlax relay --worker JSON`, not in --help): its slot,
    its instance id, its private control socket, and the agent port (resolved if it was 0)."""

    index: int
    instance: int
    control: Path
    listen_port: int
    workers: int  # how many the supervisor runs (the cluster size counts them)
    supervisor: int  # the supervisor's pid: a worker whose supervisor is gone drains and exits

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "control": str(self.control)})

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            int(data["index"]),
            int(data["instance"]),
            Path(data["control"]),
            int(data["listen_port"]),
            int(data["workers"]),
            int(data["supervisor"]),
        )


class RelayMain:
    def __init__(
        self,
        settings: RelaySettings,
        agents: Iterable[AgentSpec] = (),
        *,
        tls_wait: float = 0.0,
        tls_check_interval: float = TLS_CHECK_INTERVAL,
        worker: WorkerSpec | None = None,
    ) -> None:
        instance: Instance | None = None
        if worker is not None:
            # A worker: every port shared (SO_REUSEPORT), its control socket private, no metrics
            # port (the supervisor serves the sum), agents only once it has been told its state.
            settings = settings.model_copy(
                update={
                    "control_socket": worker.control,
                    "metrics": None,
                    "workers": worker.workers,
                    "listen": settings.listen._replace(port=worker.listen_port),
                }
            )
            instance = Instance(
                id=worker.instance,
                workers=settings.workers,
                replicas=settings.replicas,
                synced=False,
            )
        self.settings = settings
        self.worker = worker
        self.metrics = RelayMetrics()
        self.relay = Relay(
            settings,
            agents,
            observer=self.metrics,
            tls_wait=tls_wait,
            tls_check_interval=tls_check_interval,
            instance=instance,
            reuse_port=worker is not None,
            listen_after_sync=None if worker is None else True,
        )
        self.registry = self.relay.registry  # what the control socket reads and changes
        self.control: ControlServer | None = None  # once the control socket listens
        self._tg: anyio.abc.TaskGroup | None = None

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Metrics first (liveness answers while the relay waits for its TLS files), then the
        relay, then the control socket, which changes a serving relay's registry."""
        s = self.settings
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if s.metrics is not None:
                socks = await listen_sockets(s.metrics.host, s.metrics.port)
                listeners = [await SocketListener.from_socket(sock) for sock in socks]
                server = MetricsServer(self.metrics.exposition, self.readiness)
                await tg.start(server.serve, listeners)
                log.info("metrics and health on %s", format_address(local_address(socks[0])))
            await tg.start(self.relay.serve)
            if s.control_socket is not None:
                exposition = None if self.worker is None else self.metrics.exposition
                control = ControlServer(
                    self.registry,
                    s.control_socket,
                    cluster=self.relay.instance,
                    metrics=exposition,
                )
                await tg.start(control.serve)
                self.control = control
            task_status.started()

    def readiness(self) -> tuple[bool, str]:
        ok, detail = self.relay.readiness()
        if ok and self.settings.control_socket is not None and self.control is None:
            return False, "control socket not up"
        return ok, detail

    async def shutdown(self, grace: float | None = None) -> None:
        """The relay's graceful shutdown (GOAWAY, drain), then the metrics and control go."""
        await self.relay.shutdown(grace)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()


def die_with_supervisor(supervisor: int) -> None:
    """Linux: SIGTERM this process when its parent (the supervisor) dies, so that a worker never
    runs on alone; if the supervisor is already gone, drain at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask to be told of the supervisor's death (prctl unavailable)")
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)
