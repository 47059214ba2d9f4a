"""What `atlax relay` runs: the relay, its metrics and health port, and its control socket.

This is the one place that knows all three. The relay reports to its observer and never imports
the layers above it; here the observer is the Prometheus metrics, the metrics server asks this
assembly whether it is ready, and the control server is given the relay's registry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import anyio
import anyio.abc
from anyio.abc import SocketListener

from .config import AgentSpec, RelaySettings
from .control.server import ControlServer
from .metrics import MetricsServer, RelayMetrics
from .net import format_address, listen_sockets, local_address
from .relay import Relay
from .relay.server import TLS_CHECK_INTERVAL

log = logging.getLogger("atlax.relay")


class RelayMain:
    def __init__(
        self,
        settings: RelaySettings,
        agents: Iterable[AgentSpec] = (),
        *,
        tls_wait: float = 0.0,
        tls_check_interval: float = TLS_CHECK_INTERVAL,
    ) -> None:
        self.settings = settings
        self.metrics = RelayMetrics()
        self.relay = Relay(
            settings,
            agents,
            observer=self.metrics,
            tls_wait=tls_wait,
            tls_check_interval=tls_check_interval,
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
                server = MetricsServer(self.metrics, self.readiness)
                await tg.start(server.serve, listeners)
                log.info("metrics and health on %s", format_address(local_address(socks[0])))
            await tg.start(self.relay.serve)
            if s.control_socket is not None:
                control = ControlServer(self.registry, s.control_socket)
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
