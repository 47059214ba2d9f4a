"""Prometheus metrics of the relay (documented in docs/metrics.md) and its health endpoints.

Every relay owns its own registry, so several relays in one process (tests) never mix counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .http import Request, Response, serve_http_connection

log = logging.getLogger("atlax.metrics")


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.agents_connected = Gauge(
            "atlax_agents_connected", "Agents with a live tunnel.", registry=r
        )
        self.streams_open = Gauge(
            "atlax_streams_open", "Streams open now, per agent.", ["agent"], registry=r
        )
        self.streams_total = Counter(
            "atlax_streams",
            "Streams opened, per agent and service.",
            ["agent", "service"],
            registry=r,
        )
        self._bytes: dict[tuple[str, str], ByteCounter] = {}
        r.register(_ByteCollector(self._bytes))
        self.handshake_failures = Counter(
            "atlax_handshake_failures",
            "Agent connections refused before a tunnel was up, by reason.",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            "atlax_connections_refused",
            "Public client connections closed without reaching an agent, by port and reason.",
            ["port", "reason"],
            registry=r,
        )
        self.tunnel_rtt = Histogram(
            "atlax_tunnel_rtt_seconds",
            "Round-trip time of keepalive PINGs through each tunnel.",
            ["agent"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    def byte_counter(self, agent: str, service: str) -> ByteCounter:
        """The `atlax_bytes_total` counts of one agent's service (shared by its streams)."""
        counter = self._bytes.get((agent, service))
        if counter is None:
            counter = self._bytes[agent, service] = ByteCounter()
        return counter


class ByteCounter:
    """Payload bytes of one service, both ways. Plain ints, read when scraped: they change on
    every read of every stream, and a prometheus_client Counter takes a lock per `inc`."""

    __slots__ = ("from_agent", "to_agent")

    def __init__(self) -> None:
        self.to_agent = 0
        self.from_agent = 0


class _ByteCollector(Collector):
    def __init__(self, counters: dict[tuple[str, str], ByteCounter]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "atlax_bytes",
            "Stream payload bytes, per agent, service and direction (to_agent, from_agent).",
            labels=["agent", "service", "direction"],
        )
        for (agent, service), counter in list(self._counters.items()):
            family.add_metric([agent, service, "to_agent"], counter.to_agent)
            family.add_metric([agent, service, "from_agent"], counter.from_agent)
        yield family


class RateLimitedLog:
    """Log a repeated event at most once per `interval` per key, saying how many were skipped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, skipped + 1)
            return
        suffix = f" ({skipped} more like this since the last message)" if skipped else ""
        self.logger.warning(message + suffix, *args)
        self._last[key] = (now, 0)


class MetricsServer:
    """Serves GET /metrics, /healthz and /readyz on a TCP port for Prometheus and probes."""

    def __init__(self, metrics: RelayMetrics, ready: Callable[[], tuple[bool, str]]) -> None:
        self.metrics = metrics
        self.ready = ready

    async def app(self, req: Request) -> Response:
        if req.method != "GET":
            return Response.error(405, "method not allowed")
        if req.path == "/metrics":
            body = generate_latest(self.metrics.registry)
            return Response(200, body, CONTENT_TYPE_LATEST)
        if req.path == "/healthz":
            return Response.json(200, {"status": "ok"})
        if req.path == "/readyz":
            ok, detail = self.ready()
            return Response.json(
                200 if ok else 503, {"status": "ok" if ok else "not ready", "detail": detail}
            )
        return Response.error(404, f"no such endpoint: {req.path}")

    async def serve(
        self,
        listeners: list[anyio.abc.SocketListener],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        from .relay import accept_loop

        async def handle(stream: anyio.abc.SocketStream) -> None:
            await serve_http_connection(stream, self.app)

        try:
            async with anyio.create_task_group() as tg:
                for lst in listeners:
                    tg.start_soon(accept_loop, lst, handle)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                for lst in listeners:
                    await lst.aclose()
