"""Merging workers' expositions (atlax/metrics_merge.py): what the supervisor serves on /metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from atlax.supervisor.metrics import merge_expositions


class Bytes(Collector):
    """Like the relay's byte counters: plain ints read when scraped."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("atlax_bytes", "Bytes.", labels=["agent"])
        for agent, n in self.counts.items():
            family.add_metric([agent], n)
        yield family


def worker(
    streams: dict[str, int], rtts: list[float], connected: int, nbytes: dict[str, int]
) -> str:
    r = CollectorRegistry()
    c = Counter("atlax_streams", "Streams opened.", ["agent"], registry=r)
    for agent, n in streams.items():
        c.labels(agent).inc(n)
    Gauge("atlax_agents_connected", "Agents.", registry=r).set(connected)
    h = Histogram("atlax_tunnel_rtt_seconds", "RTT.", ["agent"], buckets=(0.001, 0.01), registry=r)
    for rtt in rtts:
        h.labels("home-nas").observe(rtt)
    r.register(Bytes(nbytes))
    return generate_latest(r).decode()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counters_gauges_histograms_and_collected_counters_are_summed() -> None:
    one = worker({"home-nas": 3}, [0.0005, 0.005], 1, {"home-nas": 1000})
    two = worker({"home-nas": 4, "office": 1}, [0.5], 1, {"home-nas": 24, "office": 7})
    merged = samples(merge_expositions([one, two]))
    assert merged["atlax_streams_total", (("agent", "home-nas"),)] == 7
    assert merged["atlax_streams_total", (("agent", "office"),)] == 1
    assert merged["atlax_agents_connected", ()] == 2
    assert merged["atlax_bytes_total", (("agent", "home-nas"),)] == 1024
    assert merged["atlax_bytes_total", (("agent", "office"),)] == 7
    rtt = "atlax_tunnel_rtt_seconds"
    assert merged[f"{rtt}_bucket", (("agent", "home-nas"), ("le", "0.001"))] == 1
    assert merged[f"{rtt}_bucket", (("agent", "home-nas"), ("le", "0.01"))] == 2
    assert merged[f"{rtt}_bucket", (("agent", "home-nas"), ("le", "+Inf"))] == 3
    assert merged[f"{rtt}_count", (("agent", "home-nas"),)] == 3
    assert abs(merged[f"{rtt}_sum", (("agent", "home-nas"),)] - 0.5055) < 1e-9


def test_created_timestamps_keep_the_earliest() -> None:
    one = "# HELP x_total X.\n# TYPE x_total counter\nx_total 1.0\nx_created 200.0\n"
    two = "# HELP x_total X.\n# TYPE x_total counter\nx_total 2.0\nx_created 100.0\n"
    merged = samples(merge_expositions([one, two]))
    assert merged["x_total", ()] == 3 and merged["x_created", ()] == 100


def test_an_override_replaces_a_family_and_new_ones_are_added() -> None:
    one = worker({}, [], 1, {})
    two = worker({}, [], 1, {})
    agents = GaugeMetricFamily("atlax_agents_connected", "Agents with a live tunnel.", value=1)
    workers = GaugeMetricFamily("atlax_relay_workers", "Workers ready.", value=2)
    merged = samples(
        merge_expositions(
            [one, two], {"atlax_agents_connected": agents, "atlax_relay_workers": workers}
        )
    )
    assert merged["atlax_agents_connected", ()] == 1  # one agent, though both workers have it
    assert merged["atlax_relay_workers", ()] == 2


def test_no_worker_answered_gives_an_empty_but_valid_exposition() -> None:
    assert merge_expositions([]) == b""
