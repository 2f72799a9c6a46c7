"""Prometheus metrics at `GET /metrics`, exposed by prometheus_client.

Owns the metric families (names, base units, labels) and how one finished request
updates them. Per-request families are updated once per request, from its final
record, in the recording step (never per stream chunk); what describes state now
(circuits, in-flight, budgets, queues) is read when scraped, by `StateCollector`.

Labels are bounded by the config: `route` (a public model name from the config, empty
when the request was refused before a decision), `deployment`, `team` (from the virtual
keys), `status`, `outcome`, `kind`, `error_class` (edgeroute's own vocabulary). Never a
request id, a user or any other string a client chooses.

Multiple worker processes: with `PROMETHEUS_MULTIPROC_DIR` set before start-up,
prometheus_client keeps the per-request families in per-process files, and `render`
merges them with its `MultiProcessCollector`; the scrape-time gauges describe the
process that answers the scrape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeroute import redact
from edgeroute.accounting import RequestRecord
from edgeroute.admission import ADMISSION, Admission
from edgeroute.config import Budget
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.ledger import Ledger
from edgeroute.state import RECORDER, STATE, Live

# `_created` series would double the series count for a timestamp Prometheus does not use.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds. Requests and upstream calls run from milliseconds (cached, tiny) to minutes (long streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Scrape-time sources other modules add (a queue's depth, an alert counter): name -> callable.
StateSource = Callable[[web.Application], Iterable[Metric]]


class Metrics:
    """The per-request families of one application, in its own registry (tests run many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "edgeroute_requests", "Client chat requests by route, status and outcome.",
            ["route", "status", "outcome"], registry=r,
        )  # fmt: skip
        self.request_errors = Counter(
            "edgeroute_request_errors", "Failed client requests by route and error class.",
            ["route", "error_class"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "edgeroute_request_duration_seconds", "Client-visible request duration (to the last byte).",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "edgeroute_time_to_first_token_seconds", "Client-visible time to the first content of a stream.",
            ["route"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "edgeroute_attempts", "Upstream attempts by deployment, outcome and kind (first, retry, fallback, hedge).",
            ["deployment", "outcome", "kind"], registry=r,
        )  # fmt: skip
        self.upstream = Histogram(
            "edgeroute_upstream_duration_seconds", "Duration of answered upstream attempts (to the whole answer).",
            ["deployment"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_ttft = Histogram(
            "edgeroute_upstream_time_to_first_token_seconds", "Upstream time to the first content event of a stream.",
            ["deployment"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.retries = Counter("edgeroute_retries", "Retries by route.", ["route"], registry=r)
        self.fallbacks = Counter(
            "edgeroute_fallbacks", "Attempts at another model's deployment.", ["route"], registry=r
        )
        self.hedges = Counter("edgeroute_hedges", "Hedged attempts sent, by route.", ["route"], registry=r)
        self.hedge_wins = Counter("edgeroute_hedge_wins", "Hedged attempts that answered first.", ["route"], registry=r)
        self.tokens = Counter(
            "edgeroute_tokens", "Tokens billed, by route, deployment, team and kind (prompt, completion, cached).",
            ["route", "deployment", "team", "kind"], registry=r,
        )  # fmt: skip
        self.cost = Counter(
            "edgeroute_cost_usd", "Spend in USD, by route, deployment and team (every attempt is costed).",
            ["route", "deployment", "team"], registry=r,
        )  # fmt: skip
        self.budget_actions = Counter(
            "edgeroute_budget_actions", "Requests a budget refused or downgraded.", ["budget", "action"], registry=r
        )
        # Plain counters other modules increment where they happen; exposed by StateCollector.
        self.malformed_requests = 0
        self.sources: list[StateSource] = [ledger_source, budget_source]
        # Children by label values: `labels()` validates and locks on every call, this is one dict lookup.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _c(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            # Label values are config names; a secret pasted into one must not be scraped.
            child = self._children[key] = metric.labels(*map(redact.text, values))
        return child

    def observe(self, rec: RequestRecord) -> None:
        """Updates the per-request families from a finished request's record."""
        c = self._c
        route = rec.route
        c(self.requests, route, str(rec.status), rec.outcome).inc()
        if rec.status != 200 and rec.error_class:
            c(self.request_errors, route, rec.error_class).inc()
        c(self.duration, route).observe(rec.latency_ms / 1000)
        if rec.ttft_ms is not None:
            c(self.ttft, route).observe(rec.ttft_ms / 1000)
        team = rec.team or ""
        for a in rec.attempts:
            dep = a.deployment
            kind = a.kind
            c(self.attempts, dep, a.outcome, kind).inc()
            if kind == "retry":
                c(self.retries, route).inc()
            elif kind == "fallback":
                c(self.fallbacks, route).inc()
            elif kind == "hedge":
                c(self.hedges, route).inc()
                if a.outcome == "success" and rec.deployment == dep and rec.outcome == "hedge_won":
                    c(self.hedge_wins, route).inc()
            if a.outcome == "success":
                c(self.upstream, dep).observe(a.latency_ms / 1000)
                if a.ttft_ms is not None:
                    c(self.upstream_ttft, dep).observe(a.ttft_ms / 1000)
            u = a.usage
            if u is not None:
                c(self.tokens, route, dep, team, "prompt").inc(u.prompt_tokens)
                c(self.tokens, route, dep, team, "completion").inc(u.completion_tokens)
                if u.cached_tokens:
                    c(self.tokens, route, dep, team, "cached").inc(u.cached_tokens)
            if a.cost_usd:
                c(self.cost, route, dep, team).inc(a.cost_usd)
        if rec.admission:
            action, _, budget = rec.admission.partition(":")
            c(self.budget_actions, budget, action).inc()

    def render(self, app: web.Application) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry(auto_describe=False)
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Registered(self.registry))
        registry.register(StateCollector(app, self))
        return generate_latest(registry)


class _Registered(Collector):
    """Another registry's collectors, so that one scrape renders them beside the state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


class StateCollector(Collector):
    """Gauges and counters read from the running proxy when scraped."""

    def __init__(self, app: web.Application, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        state = self._app[STATE]
        c = state.counters
        yield _gauge("edgeroute_requests_in_flight", "Client requests in flight.", c.in_flight)
        yield _counter("edgeroute_requests_shed", "Requests refused at once because the proxy was at capacity.", c.shed)
        yield _counter(
            "edgeroute_malformed_requests", "Requests the HTTP parser refused.", self._metrics.malformed_requests
        )
        live = state.live
        circuit = GaugeMetricFamily(
            "edgeroute_deployment_circuit_state", "Circuit state: 0 closed, 1 half-open, 2 open.", labels=["deployment"]
        )
        in_flight = GaugeMetricFamily(
            "edgeroute_deployment_in_flight", "Upstream attempts in flight.", labels=["deployment"]
        )
        latency = GaugeMetricFamily(
            "edgeroute_deployment_latency_seconds",
            "Peak-EWMA latency of successful attempts (what routing sees).",
            labels=["deployment"],
        )
        errors = GaugeMetricFamily(
            "edgeroute_deployment_error_ratio", "EWMA of the share of failed attempts, 0..1.", labels=["deployment"]
        )
        cooldown = GaugeMetricFamily(
            "edgeroute_deployment_cooldown_seconds", "Time left in a rate-limit cool-down.", labels=["deployment"]
        )
        for d in live.deployments:
            h = live.router.health(d.index)
            name = redact.text(d.name)
            circuit.add_metric([name], CIRCUIT_STATES[h["circuit"]])
            in_flight.add_metric([name], h["in_flight"])
            latency.add_metric([name], h["latency_ms"] / 1000)
            errors.add_metric([name], h["error_rate"])
            cooldown.add_metric([name], h["cooldown_ms"] / 1000)
        yield from (circuit, in_flight, latency, errors, cooldown)
        for source in self._metrics.sources:
            yield from source(self._app)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter family (`name` without `_total`, which the exposition adds)."""
    return CounterMetricFamily(name, doc, value=value)


gauge, counter = _gauge, _counter  # for the scrape-time sources of other modules


def ledger_source(app: web.Application) -> Iterable[Metric]:
    """The spend ledger's queue and counters (its writer also writes the request log)."""
    ledger = app.get(RECORDER)
    if not isinstance(ledger, Ledger):
        return
    yield _gauge("edgeroute_ledger_queue_depth", "Records waiting for the ledger's writer.", ledger.queue_depth())
    yield _counter("edgeroute_ledger_written", "Requests written to the spend ledger.", ledger.written)
    yield _counter(
        "edgeroute_ledger_failed_batches", "Ledger writes that failed and were kept to retry.", ledger.failed_batches
    )
    yield _counter(
        "edgeroute_ledger_set_aside", "Ledger records the store rejected (logged instead).", ledger.set_aside
    )


def budget_spend(control: Admission | None, live: Live, now: float) -> Iterator[tuple[Budget, float]]:
    """(budget, USD spent and reserved this period) for each budget with a fixed subject (a
    `match`, or global), as this process's budget store holds it.

    Per-subject budgets without `match` are left out (one series per key or user would be
    unbounded); so are budgets kept in Redis, whose totals this process does not hold.
    """
    if not isinstance(control, CostControl) or live.config.shared_state is not None:
        return
    for b in control.budgets:
        if b.scope == "global" or b.match is not None:
            c = B.charge(b, b.match or "*", B.period_of(b, now), 0, -1)
            yield b, control.local_budgets.used(c) / B.NANO


def budget_source(app: web.Application) -> Iterable[Metric]:
    used = GaugeMetricFamily("edgeroute_budget_used_usd", "Spend (and reservations) this period.", labels=["budget"])
    limit = GaugeMetricFamily("edgeroute_budget_limit_usd", "A budget's limit per period.", labels=["budget"])
    for b, spent in budget_spend(app.get(ADMISSION), app[STATE].live, time.time()):
        used.add_metric([b.name], spent)
        limit.add_metric([b.name], b.limit_usd)
    yield used
    yield limit


METRICS = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render(request.app)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})
