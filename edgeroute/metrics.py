"""Prometheus metrics at `GET /metrics`, exposed by prometheus_client.

Owns the metric families (names, base units, labels) and how one finished request
updates them. Per-request families are updated once per request, from its final
record, in the recording step (never per stream chunk); what describes state now
(circuits, in-flight, budgets, queues) is read when scraped, by `StateCollector`.

Labels are bounded by the config: `route` (a public model name from the config, empty
when the request was refused before a decision, or the path of a free endpoint refused at
its key's RPM: `free_requests`), `deployment`, `team` (from the virtual
keys), `status`, `outcome`, `kind`, `error_class` (edgeroute's own vocabulary). Never a
request id, a user or any other string a client chooses.

The per-request families are plain numbers per process, exposed through prometheus_client's
families (`Metrics.collect`). Under `serve --workers N` each worker holds its own, and the
worker that takes a scrape merges its siblings' (`workers/merge.py`): prometheus_client's
multiprocess mode would do that for its own metric objects, which cost about four times as
much per request here (see `Metrics`).

A scrape's numbers are copied on the loop and formatted in a thread, one render shared by the
scrapes that arrive together, begun after they arrived and paced (`metrics_render`).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeroute import metrics_render, redact, secrets
from edgeroute.accounting import OVERRAN, RequestRecord
from edgeroute.admission import ADMISSION, Admission
from edgeroute.config import Budget
from edgeroute.cost import budget_report, overreport, underreport
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.ledger import Ledger
from edgeroute.state import RECORDER, STATE, Live
from edgeroute.workers import peers
from edgeroute.workers.merge import merge
from edgeroute.workers.worker import WORKER, Worker

# Seconds. Requests and upstream calls run from milliseconds (cached, tiny) to minutes (long streams).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Scrape-time sources other modules add (a queue's depth, an alert counter): name -> callable.
StateSource = Callable[[web.Application], Iterable[Metric]]


class _Hist:
    """Bucket counts (non-cumulative, the last one +Inf) and the sum of one labelled histogram."""

    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * (n + 1)
        self.sum = 0.0


class _Count:
    """One labelled counter's value (a series exists once it has been added to, even 0)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0.0


# name, help, label names, buckets (None: a counter; the exposition adds `_total`).
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "requests": ("edgeroute_requests", "Client chat requests by route, status and outcome.",
                 ("route", "status", "outcome"), None),
    "request_errors": ("edgeroute_request_errors", "Failed client requests by route and error class.",
                       ("route", "error_class"), None),
    "duration": ("edgeroute_request_duration_seconds", "Client-visible request duration (to the last byte).",
                 ("route",), LATENCY_BUCKETS),
    "ttft": ("edgeroute_time_to_first_token_seconds", "Client-visible time to the first content of a stream.",
             ("route",), TTFT_BUCKETS),
    "queue": ("edgeroute_queue_seconds", "Time requests waited for a deployment's capacity (only those that "
              "waited), by route and priority class.", ("route", "class"), LATENCY_BUCKETS),
    "attempts": ("edgeroute_attempts", "Upstream attempts by deployment, outcome and kind (first, retry, fallback, "
                 "hedge).", ("deployment", "outcome", "kind"), None),
    "upstream": ("edgeroute_upstream_duration_seconds", "Duration of answered upstream attempts (to the whole "
                 "answer).", ("deployment",), LATENCY_BUCKETS),
    "upstream_ttft": ("edgeroute_upstream_time_to_first_token_seconds", "Upstream time to the first content event "
                      "of a stream.", ("deployment",), TTFT_BUCKETS),
    "retries": ("edgeroute_retries", "Retries by route.", ("route",), None),
    "fallbacks": ("edgeroute_fallbacks", "Attempts at another model's deployment.", ("route",), None),
    "hedges": ("edgeroute_hedges", "Hedged attempts sent, by route.", ("route",), None),
    "hedge_wins": ("edgeroute_hedge_wins", "Hedged attempts that answered first.", ("route",), None),
    "tokens": ("edgeroute_tokens", "Tokens billed, by route, deployment, team and kind (prompt, completion, cached).",
               ("route", "deployment", "team", "kind"), None),
    "cost": ("edgeroute_cost_usd", "Spend in USD, by route, deployment and team (every attempt is costed).",
             ("route", "deployment", "team"), None),
    "budget_actions": ("edgeroute_budget_actions", "Requests a budget refused or downgraded.",
                       ("budget", "action"), None),
    "overruns": ("edgeroute_upstream_overruns", "Answers an upstream sent past the request's max_tokens (a stream "
                 "ended there), by deployment.", ("deployment",), None),
    "usage_corrections": ("edgeroute_upstream_usage_corrections", "Answers whose reported usage could not be true "
                          "for the request and its text, charged as edgeroute counted or bounded it, by deployment "
                          "and kind (upstream_underreported_usage, upstream_overreported_usage).",
                          ("deployment", "kind"), None),
}  # fmt: skip

# The error classes of a usage charged otherwise than reported (`cost.underreport`, `cost.overreport`).
_USAGE_CORRECTIONS = frozenset({underreport.CODE, overreport.CODE})
# The series an attempt adds to, as `Metrics._attempt_series` lists them (None until first added to).
_COUNT, _PROMPT, _COMPLETION, _CACHED, _COST, _UPSTREAM, _UPSTREAM_TTFT = range(7)
# Attempts' label combinations kept for the lookup (route x team x deployment x outcome x kind can
# be many more than any one family's series, which stay whatever is dropped here).
_SERIES_KEPT = 4096


class _LabelValues:
    """Label values as scraped: each redacted once while the known secrets stay the same. A
    scrape redacted every value of every series, a third of its time, on the event loop (a
    viewer key looping on /metrics held every client)."""

    _BOUND = 1 << 16  # values kept; past it, the memo starts afresh

    def __init__(self) -> None:
        self._shown: dict[str, str] = {}
        self._under: tuple[int, ...] = ()

    def current(self) -> Callable[[str], str]:
        """What a value is shown as, under the secrets known now."""
        under = redact.known_changes()
        if under != self._under or len(self._shown) > self._BOUND:
            self._shown, self._under = {}, under
        shown = self._shown

        def show(value: str) -> str:
            out = shown.get(value)
            if out is None:
                out = shown[value] = redact.text(value)
            return out

        return show


class Metrics:
    """The per-request families of one application.

    Kept as plain numbers keyed by label values and turned into prometheus_client families
    when scraped: updating prometheus_client's own metric objects (a label lookup, a validity
    check and a lock per update) cost about four times as much per request. A request's series
    (by route, status and outcome) and an attempt's (by route, team, deployment, outcome and
    kind: its count, tokens, cost and durations) are found with one lookup each, their
    counters' cells kept together: a lookup per family was ~14,000 instructions an attempt.
    """

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple[Any, ...], _Count]] = {k: {} for k, f in _FAMILIES.items() if f[3] is None}
        self.histograms: dict[str, dict[tuple[str, ...], _Hist]] = {
            k: {} for k, f in _FAMILIES.items() if f[3] is not None
        }
        # (route, status, outcome) -> its requests counter, the route's duration and TTFT histograms
        self._requests: dict[tuple[Any, ...], tuple[_Count, _Hist, _Hist]] = {}
        # (route, team, deployment, outcome, kind) -> the attempt's series, `_COUNT` ... `_UPSTREAM_TTFT`
        self._attempt_series: dict[tuple[str, ...], list[Any]] = {}
        # Plain counters other modules increment where they happen; exposed by StateCollector.
        self.malformed_requests = 0
        self.connections_shed = 0  # client connections closed or refused at the cap
        self.client_connections: Sized = ()  # the server's open client connections (a set)
        self.sources: list[StateSource] = [ledger_source, budget_source, secrets_source]
        self.label_values = _LabelValues()
        # The last render of this process's series and of the server's (merged under `--workers`).
        self.own = metrics_render.Renders()
        self.merged = metrics_render.Renders()
        # Budgets counted in a shared store (Redis, the workers' file), as the telemetry loop last
        # read them: a scrape cannot wait for the store, and this process's counters hold nothing.
        self.shared_budgets: list[tuple[Budget, float]] = []

    def _count(self, family: str, key: tuple[Any, ...]) -> _Count:
        """The counter of `family` labelled `key`, made (exposed) now if it is new."""
        got = self.counters[family].get(key)
        if got is None:
            got = self.counters[family][key] = _Count()
        return got

    def _hist(self, family: str, key: tuple[str, ...]) -> _Hist:
        h = self.histograms[family].get(key)
        if h is None:
            buckets = _FAMILIES[family][3]
            assert buckets is not None
            h = self.histograms[family][key] = _Hist(len(buckets))
        return h

    def _observe(self, family: str, key: tuple[str, ...], seconds: float) -> None:
        h = self._hist(family, key)
        h.counts[bisect.bisect_left(_FAMILIES[family][3], seconds)] += 1  # type: ignore[arg-type]
        h.sum += seconds

    def _request(self, key: tuple[Any, ...]) -> tuple[_Count, _Hist, _Hist]:
        """A request's counter and its route's histograms (made once per route and status,
        then looked up once per request). The histograms are made with the route, and shown
        once observed."""
        route = (key[0],)
        got = self._requests[key] = (
            self._count("requests", key),
            self.histograms["duration"].setdefault(route, _Hist(len(LATENCY_BUCKETS))),
            self.histograms["ttft"].setdefault(route, _Hist(len(TTFT_BUCKETS))),
        )
        return got

    def observe(self, rec: RequestRecord) -> None:
        """Updates the per-request families from a finished request's record."""
        route = rec.route
        key = (route, rec.status, rec.outcome)
        count, duration, ttft = self._requests.get(key) or self._request(key)
        count.n += 1
        if rec.error_class:
            # A stream an error ended after content failed its client too, under its 200.
            if rec.status != 200 or (rec.outcome == "stream_interrupted" and rec.error_class != OVERRAN):
                self._count("request_errors", (route, rec.error_class)).n += 1
            elif rec.error_class == OVERRAN:
                self._count("overruns", (rec.deployment or "",)).n += 1
            elif rec.error_class in _USAGE_CORRECTIONS:
                self._count("usage_corrections", (rec.deployment or "", rec.error_class)).n += 1
        seconds = rec.latency_ms / 1000
        duration.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        duration.sum += seconds
        if rec.ttft_ms is not None:
            seconds = rec.ttft_ms / 1000
            ttft.counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
            ttft.sum += seconds
        if rec.queue_ms:
            self._observe("queue", (route, rec.priority or ""), rec.queue_ms / 1000)
        if rec.attempts:
            self._attempts(rec)
        if rec.admission:
            action, _, budget = rec.admission.partition(":")
            self._count("budget_actions", (budget, action)).n += 1

    def observe_mirror(self, rec: RequestRecord) -> None:
        """A shadow mirror's attempts, tokens and cost: upstream calls paid for like any other
        (the request families count clients' requests only)."""
        self._attempts(rec)

    def _attempts(self, rec: RequestRecord) -> None:
        route = rec.route
        team = rec.team or ""
        every = self._attempt_series
        for a in rec.attempts:
            dep, kind, outcome = a.deployment, a.kind, a.outcome
            series = every.get((route, team, dep, outcome, kind))
            if series is None:
                if len(every) >= _SERIES_KEPT:  # a lookup's shortcut: the counters stay in their families
                    every.clear()
                series = every[(route, team, dep, outcome, kind)] = [None] * 7
                series[_COUNT] = self._count("attempts", (dep, outcome, kind))
            series[_COUNT].n += 1
            if kind != "first":
                self._kind(rec, a.deployment, kind, outcome)
            if outcome == "success":
                h = series[_UPSTREAM] or self._made(series, _UPSTREAM, self._hist("upstream", (dep,)))
                seconds = a.latency_ms / 1000
                h.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                h.sum += seconds
                if a.ttft_ms is not None:
                    h = series[_UPSTREAM_TTFT] or self._made(
                        series, _UPSTREAM_TTFT, self._hist("upstream_ttft", (dep,))
                    )
                    seconds = a.ttft_ms / 1000
                    h.counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
                    h.sum += seconds
            u = a.usage
            if u is not None:
                count = series[_PROMPT] or self._made(
                    series, _PROMPT, self._count("tokens", (route, dep, team, "prompt"))
                )
                count.n += u.prompt_tokens
                count = series[_COMPLETION] or self._made(
                    series, _COMPLETION, self._count("tokens", (route, dep, team, "completion"))
                )
                count.n += u.completion_tokens
                if u.cached_tokens:
                    count = series[_CACHED] or self._made(
                        series, _CACHED, self._count("tokens", (route, dep, team, "cached"))
                    )
                    count.n += u.cached_tokens
            if a.cost_usd:
                count = series[_COST] or self._made(series, _COST, self._count("cost", (route, dep, team)))
                count.n += a.cost_usd

    @staticmethod
    def _made(series: list[Any], i: int, made: Any) -> Any:
        series[i] = made
        return made

    def _kind(self, rec: RequestRecord, dep: str, kind: str, outcome: str) -> None:
        """A retry's, a fallback's or a hedge's own counters (by route)."""
        route = (rec.route,)
        if kind == "retry":
            self._count("retries", route).n += 1
        elif kind == "fallback":
            self._count("fallbacks", route).n += 1
        elif kind == "hedge":
            self._count("hedges", route).n += 1
            if outcome == "success" and rec.deployment == dep and rec.outcome == "hedge_won":
                self._count("hedge_wins", route).n += 1

    def collect(self) -> Iterable[Metric]:
        """The per-request families, as a scrape shows them."""
        return self._families(*self._numbers(), self.label_values.current())

    def _numbers(self) -> tuple[dict[str, dict[tuple[Any, ...], _Count]], dict[str, list[tuple[Any, ...]]]]:
        """The per-request numbers as they are now, for a thread to format while the loop adds to
        them: the counters' tables copied (a counter's value is one float, read whole) and the
        observed histograms' cells (a bucket and the sum are added to apart)."""
        counters = {key: table.copy() for key, table in self.counters.items()}
        histograms = {
            key: [(values, h.counts.copy(), h.sum) for values, h in table.items() if any(h.counts)]
            for key, table in self.histograms.items()
        }
        return counters, histograms

    @staticmethod
    def _families(
        counters: dict[str, dict[tuple[Any, ...], _Count]],
        histograms: dict[str, list[tuple[Any, ...]]],
        shown: Callable[[str], str],
    ) -> Iterator[Metric]:
        """Label values are config names (and edgeroute's own words); they still go through the
        redaction layer: a secret pasted into a name must not be scraped."""
        for key, (name, doc, labels, buckets) in _FAMILIES.items():
            if buckets is None:
                counter = CounterMetricFamily(name, doc, labels=list(labels))
                for values, count in counters[key].items():
                    counter.add_metric([shown(str(v)) for v in values], count.n)
                yield counter
            else:
                hist = HistogramMetricFamily(name, doc, labels=list(labels))
                les = [*(repr(b) for b in buckets), "+Inf"]
                for values, counts, total in histograms[key]:  # observed ones only (`_request` makes them early)
                    cumulative: list[tuple[str, float]] = list(zip(les, itertools.accumulate(counts), strict=True))
                    hist.add_metric([shown(v) for v in values], cumulative, total)
                yield hist

    def snapshot(self, app: web.Application) -> Callable[[], bytes]:
        """Reads the numbers, on the loop (a copy: cheap); returns their formatting, for a thread."""
        numbers = self._numbers()
        state = list(StateCollector(app, self).collect())
        shown = self.label_values.current()
        return lambda: generate_latest(_Fixed([*self._families(*numbers, shown), *state]))

    async def rendered(self, app: web.Application) -> bytes:
        """This process's exposition, formatted off the loop."""
        return await metrics_render.in_thread(self.snapshot(app))

    async def own_body(self, app: web.Application) -> bytes:
        """This worker's exposition, for a scrape's merge (its own or a sibling's): shared by the
        merges that ask together, not paced (each worker paces its merges; waiting for a gap
        here too could outlast `peers.PEER_TIMEOUT_S`, the worker then counted down)."""
        return (await self.own.get(lambda: self.rendered(app), paced=False)).text


class _Fixed(CollectorRegistry):
    """A registry of families already read."""

    def __init__(self, families: list[Metric]) -> None:
        super().__init__(auto_describe=False)
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


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
        yield _gauge("edgeroute_client_connections", "Client connections open.", len(self._metrics.client_connections))
        yield _counter(
            "edgeroute_client_connections_shed",
            "Client connections closed or refused because the server held its maximum (idle ones first).",
            self._metrics.connections_shed,
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
        sender_ejections = CounterMetricFamily(
            "edgeroute_circuit_sender_ejections",
            "Ejections of a deployment for one sender (key or team) alone: its failures alone tripped"
            " the circuit while other senders were seen; the others are still served.",
            labels=["deployment"],
        )
        withheld = CounterMetricFamily(  # deprecated alias, kept so dashboards do not break
            "edgeroute_circuit_trips_withheld",
            "Deprecated: the same count as edgeroute_circuit_sender_ejections_total.",
            labels=["deployment"],
        )
        shown = self._metrics.label_values.current()
        for d in live.deployments:
            h = live.router.health(d.index)
            name = shown(d.name)
            circuit.add_metric([name], CIRCUIT_STATES[h["circuit"]])
            in_flight.add_metric([name], h["in_flight"])
            latency.add_metric([name], h["latency_ms"] / 1000)
            errors.add_metric([name], h["error_rate"])
            cooldown.add_metric([name], h["cooldown_ms"] / 1000)
            sender_ejections.add_metric([name], h["sender_ejections"])
            withheld.add_metric([name], h["sender_ejections"])
        yield from (circuit, in_flight, latency, errors, cooldown, sender_ejections, withheld)
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
    yield _gauge(
        "edgeroute_ledger_queue_depth",
        "Records not in the database yet (queued, or in the batch being written).",
        ledger.queue_depth(),
    )
    failing = ledger.failing_since
    yield _gauge(
        "edgeroute_ledger_failing_seconds",
        "How long the ledger has not written (its writes fail, or one has hung past its bound); 0 while it writes.",
        0.0 if failing is None else time.monotonic() - failing,
    )
    yield _counter("edgeroute_ledger_written", "Requests written to the spend ledger.", ledger.written)
    yield _counter(
        "edgeroute_ledger_spilled",
        "Records logged instead of held in memory: too many waited unwritten.",
        ledger.spilled,
    )
    yield _counter(
        "edgeroute_ledger_failed_batches", "Ledger writes that failed and were kept to retry.", ledger.failed_batches
    )
    yield _counter(
        "edgeroute_ledger_set_aside", "Ledger records the store rejected (logged instead).", ledger.set_aside
    )
    yield _counter(
        "edgeroute_ledger_already_recorded",
        "Ledger records not written: their request had a spend row already (another instance's crashed row).",
        ledger.already_recorded,
    )
    yield _counter(
        "edgeroute_request_log_dropped",
        "Request-log rows not written because the writer was too far behind (spend and stats still written).",
        ledger.log_dropped,
    )


def secrets_source(app: web.Application) -> Iterable[Metric]:
    """`file:`/`exec:` secrets read again while running: refreshes, failures, and how many fail now."""
    status = secrets.STATUS
    yield _counter("edgeroute_secret_refreshes", "Times a file:/exec: secret was read again.", status.refreshes_total)
    yield _counter(
        "edgeroute_secret_refresh_failures",
        "Refreshes that failed (the last good value stayed in use).",
        status.refresh_failures_total,
    )
    yield _gauge("edgeroute_secrets_failing", "Secret references whose last refresh failed.", len(status.failing))


def budget_spend(control: Admission | None, live: Live, now: float) -> Iterator[tuple[Budget, float]]:
    """(budget, USD spent and reserved this period) for each budget with a fixed subject (a
    `match`, or global), as this process's budget store holds it.

    Per-subject budgets without `match` are left out (one series per key or user would be
    unbounded); so are budgets kept in a shared store (Redis, the workers' file), whose totals
    this process does not hold (`budget_spend_now` reads them).
    """
    if not isinstance(control, CostControl) or control.shared is not None:
        return
    for b in control.budgets:
        if b.scope == "global" or b.match is not None:
            c = B.charge(b, b.match or "*", B.period_of(b, now), 0, -1)
            yield b, control.local_budgets.used(c) / B.NANO


async def budget_spend_now(control: Admission | None, live: Live, now: float) -> list[tuple[Budget, float]]:
    """As `budget_spend`, read where admission counts: the shared store (Redis, or the file of
    `serve --workers N`) when one is in use and up, else this process's counters, which under
    a shared store hold nothing (for the alerts, which may wait for a read)."""
    if not isinstance(control, CostControl):
        return []
    fixed = [b for b in control.budgets if b.scope == "global" or b.match is not None]
    charges = [B.charge(b, b.match or "*", B.period_of(b, now), 0, -1) for b in fixed]
    used = await budget_report.used(control, charges)
    return [(b, u / B.NANO) for b, u in zip(fixed, used, strict=True)]


def budget_source(app: web.Application) -> Iterable[Metric]:
    used = GaugeMetricFamily("edgeroute_budget_used_usd", "Spend (and reservations) this period.", labels=["budget"])
    limit = GaugeMetricFamily("edgeroute_budget_limit_usd", "A budget's limit per period.", labels=["budget"])
    control = app.get(ADMISSION)
    shared = isinstance(control, CostControl) and control.shared is not None
    seen = app[METRICS].shared_budgets if shared else budget_spend(control, app[STATE].live, time.time())
    for b, spent in seen:
        used.add_metric([b.name], spent)
        limit.add_metric([b.name], b.limit_usd)
    yield used
    yield limit


METRICS = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    app = request.app
    app[STATE].live.access.check_metrics(request)
    metrics = app[METRICS]
    worker = app.get(WORKER)
    if worker is None:
        body = await metrics.own.get(lambda: metrics.rendered(app))
    else:  # one scrape for the whole server: every worker's numbers, merged
        body = await metrics.merged.get(lambda: _merged(app, worker))
    # Its series name keys and teams: not kept by a browser or a cache, as the admin API's answers.
    headers = {"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    if "gzip" in request.headers.get("Accept-Encoding", ""):  # as Prometheus asks: a tenth of the bytes
        headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return web.Response(body=await body.gzipped(), headers=headers)
    return web.Response(body=body.text, headers=headers)


async def _merged(app: web.Application, worker: Worker) -> bytes:
    bodies = {worker.id: await app[METRICS].own_body(app), **await peers.siblings(worker)}
    restarts = worker.restarts()
    return await metrics_render.in_thread(lambda: merge(bodies, restarts))
