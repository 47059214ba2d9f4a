"""Totals of several Prometheus expositions: what `atlax relay --workers N` serves on /metrics.

The supervisor scrapes each worker's /metrics (over the worker's private control socket) and
serves the sum, so a worker's metrics code is exactly what a single relay runs. prometheus_client's
multiprocess mode was the alternative; it cannot carry the relay's byte counters (plain ints read by
a collector at scrape time: multiprocess mode aggregates only its own values, written to one file
per process) and would put a file write on every `inc()` (docs/high-availability.md).

Samples with the same name and labels are summed (counters, gauges, histogram buckets, sums and
counts), except `*_created` timestamps, of which the earliest is kept. A family may be replaced
outright (`override`): a gauge whose sum over workers means something else, such as agents
connected (an agent with a tunnel to every worker is one agent).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

LabelKey = tuple[tuple[str, str], ...]


@dataclass
class _Family:
    name: str
    documentation: str
    type: str
    samples: dict[tuple[str, LabelKey], float] = field(default_factory=dict)


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_expositions(texts: Iterable[str], override: Mapping[str, Metric] | None = None) -> bytes:
    """One exposition (text format 0.0.4) with the totals of `texts`; families in `override`
    (by name, as the parser names them: `atlax_streams` for `atlax_streams_total`) replace the
    merged ones or are added."""
    families: dict[str, _Family] = {}
    for text in texts:
        for parsed in text_string_to_metric_families(text):
            family = families.get(parsed.name)
            if family is None:
                family = families[parsed.name] = _Family(
                    parsed.name, parsed.documentation, parsed.type
                )
            for sample in parsed.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = family.samples.get(key)
                if old is None:
                    family.samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    family.samples[key] = min(old, sample.value)
                else:
                    family.samples[key] = old + sample.value
    out: list[Metric] = []
    override = dict(override or {})
    for name, family in families.items():
        replacement = override.pop(name, None)
        if replacement is not None:
            out.append(replacement)
            continue
        metric = Metric(family.name, family.documentation, family.type)
        for (sample_name, labels), value in family.samples.items():
            metric.add_sample(sample_name, dict(labels), value)
        out.append(metric)
    out.extend(override.values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(out))
    return generate_latest(registry)
