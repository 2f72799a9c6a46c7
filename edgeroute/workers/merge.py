"""One `/metrics` for all workers: their expositions merged into one.

Counters and histograms are summed over the workers (the whole server's requests, spend,
latency distribution); `_created` samples keep the earliest. Gauges describe one process
(in-flight requests, circuits as this worker sees them, a budget's spend as this worker
last read it) and are kept per worker under a `worker` label, since a sum of them would
mean nothing. Added: `edgeroute_workers` (workers that answered this scrape),
`edgeroute_worker_up{worker}` and `edgeroute_worker_restarts_total`.

A worker that exits loses its counts from the sum until Prometheus sees the counter reset,
like any restarted process; `edgeroute_worker_restarts_total` says when that happened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

_SUMMED = frozenset({"counter", "histogram", "summary", "unknown", "untyped"})

LabelKey = tuple[str, tuple[tuple[str, str], ...]]


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge(bodies: Mapping[int, bytes | None], restarts: int) -> bytes:
    """The merged exposition of every worker's own (`bodies`: worker -> text, None if it did not answer)."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[LabelKey, float]] = {}
    for wid in sorted(bodies):
        body = bodies[wid]
        if body is None:
            continue
        for fam in text_string_to_metric_families(body.decode()):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                sums[fam.name] = {}
            if fam.type in _SUMMED:
                acc = sums[fam.name]
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if key not in acc:
                        acc[key] = s.value
                    elif s.name.endswith("_created"):
                        acc[key] = min(acc[key], s.value)
                    else:
                        acc[key] += s.value
            else:
                for s in fam.samples:
                    out.add_sample(s.name, {**s.labels, "worker": str(wid)}, s.value)
    for name, acc in sums.items():
        for (sample, labels), value in acc.items():
            families[name].add_sample(sample, dict(labels), value)
    up = GaugeMetricFamily("edgeroute_worker_up", "1 when the worker answered this scrape.", labels=["worker"])
    for wid in sorted(bodies):
        up.add_metric([str(wid)], 0.0 if bodies[wid] is None else 1.0)
    answered = sum(b is not None for b in bodies.values())
    extra = [
        GaugeMetricFamily("edgeroute_workers", "Worker processes that answered this scrape.", value=answered),
        up,
        CounterMetricFamily("edgeroute_worker_restarts", "Workers the supervisor restarted.", value=restarts),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*families.values(), *extra]))
    return generate_latest(registry)
