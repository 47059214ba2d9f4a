"""Prometheus metrics of the relay (documented in docs/metrics.md) and its health endpoints.

`RelayMetrics` is the relay's observer: the relay calls it as things happen and never imports
it. Every instance owns its own registry, so several relays in one process (tests) never mix
counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .http import Request, Response, serve_http_connection
from .net import accept_loop
from .protocol import ConnectionEnd
from .relay import ByteCounter, DatagramDrop, Eviction, HandshakeFailure, Refusal, RelayObserver


class RelayMetrics(RelayObserver):
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
        self.datagrams_dropped = Counter(
            "atlax_udp_datagrams_dropped",
            "Datagrams of admitted UDP flows dropped at the relay, by port and reason.",
            ["port", "reason"],
            registry=r,
        )
        self.evicted = Counter(
            "atlax_connections_evicted",
            "Public connections closed to make room for a newcomer at a limit, by port and "
            "reason (idle: no byte either way for the longest in that scope).",
            ["port", "reason"],
            registry=r,
        )
        self.waited = Counter(
            "atlax_connections_waited",
            "Public connections held for their agent's tunnel on this instance (agent_wait), "
            "by port and outcome (served, refused).",
            ["port", "outcome"],
            registry=r,
        )
        self.tunnel_ends = Counter(
            "atlax_tunnel_ends",
            "Agent tunnels that ended, by the session's end reason.",
            ["reason"],
            registry=r,
        )
        self.rtt = Histogram(
            "atlax_tunnel_rtt_seconds",
            "Round-trip time of keepalive PINGs through each tunnel.",
            ["agent"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    # -- RelayObserver -------------------------------------------------------------------------

    def agent_connected(self, agent: str) -> None:
        self.agents_connected.inc()

    def agent_disconnected(self, agent: str) -> None:
        self.agents_connected.dec()

    def tunnel_ended(self, agent: str, end: ConnectionEnd) -> None:
        self.tunnel_ends.labels(end.reason.value).inc()

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        self.handshake_failures.labels(reason.value).inc()

    def stream_opened(self, agent: str, service: str) -> ByteCounter:
        """Counts the stream; returns the service's `atlax_bytes_total` counts (shared by its
        streams, read at scrape time)."""
        self.streams_open.labels(agent).inc()
        self.streams_total.labels(agent, service).inc()
        counter = self._bytes.get((agent, service))
        if counter is None:
            counter = self._bytes[agent, service] = ByteCounter()
        return counter

    def stream_closed(self, agent: str, service: str) -> None:
        self.streams_open.labels(agent).dec()

    def connection_refused(self, port: int, reason: Refusal) -> None:
        self.refused.labels(str(port), reason.value).inc()

    def connection_evicted(self, port: int, reason: Eviction) -> None:
        self.evicted.labels(str(port), reason.value).inc()

    def datagram_dropped(self, port: int, reason: DatagramDrop) -> None:
        self.datagrams_dropped.labels(str(port), reason.value).inc()

    def exposition(self) -> bytes:
        """The Prometheus text of every metric of this relay."""
        return generate_latest(self.registry)

    def connection_waited(self, port: int, served: bool) -> None:
        self.waited.labels(str(port), "served" if served else "refused").inc()

    def tunnel_rtt(self, agent: str, seconds: float) -> None:
        self.rtt.labels(agent).observe(seconds)


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


class MetricsServer:
    """Serves GET /metrics, /healthz and /readyz on a TCP port for Prometheus and probes."""

    def __init__(
        self,
        exposition: Callable[[], bytes | Awaitable[bytes]],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self.exposition = exposition  # a relay's metrics, or a supervisor's sum of its workers'
        self.ready = ready

    async def app(self, req: Request) -> Response:
        if req.method != "GET":
            return Response.error(405, "method not allowed")
        if req.path == "/metrics":
            body = self.exposition()
            if not isinstance(body, bytes):
                body = await body
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
