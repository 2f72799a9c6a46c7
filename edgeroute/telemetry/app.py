"""What a finished request feeds (metrics, the decision log, alerts, traces) and the routes
and background tasks of the telemetry package.

`finished()` is the one call the request path makes once a request is over (after its
record went to the ledger): it schedules the request's metrics, decision-log line,
alert-window samples and trace for the next turn of the event loop, so that none of
them delays the answer being written. `install()` wires the routes and background
tasks of this package into an application.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import AsyncIterator, Iterable

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgeroute import redact, redis_client
from edgeroute.accounting import UNROUTED, RequestRecord
from edgeroute.admission import ADMISSION
from edgeroute.config import Budget, Config
from edgeroute.errors import ProxyError, too_many
from edgeroute.governance.runtime import GOV, actor_of
from edgeroute.governance.write_limit import WriteLimit
from edgeroute.metrics import METRICS, Metrics, budget_spend_now, metrics_endpoint
from edgeroute.shadow import MIRRORED
from edgeroute.state import STATE
from edgeroute.telemetry import notify, tracing
from edgeroute.telemetry.alert_claims import AlertClaims
from edgeroute.telemetry.alerts import AlertEngine
from edgeroute.telemetry.history import DeploymentHistory, parse_since
from edgeroute.telemetry.notify import Notifier
from edgeroute.telemetry.tracing import TRACER
from edgeroute.telemetry.window import SLOT_S, Window
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.telemetry")

# The decision log: off unless `server.decision_log` (then one line per request).
DECISIONS = logging.getLogger("edgeroute.decisions")


def decision_fields(rec: RequestRecord, reasons: list[str]) -> dict[str, object]:
    """What was decided for a request and how it went; ids and numbers only, no prompt, no key."""
    return {
        "request_id": rec.request_id,
        "model": redact.text(rec.model),  # the client's text: it may hold a pasted key
        "route": rec.route,
        "rule": rec.rule,
        "why": reasons,
        "task": rec.task,
        "deployment": rec.deployment,
        "attempts": [[a.deployment, a.outcome, a.status] for a in rec.attempts],
        "status": rec.status,
        "outcome": rec.outcome,
        "latency_ms": round(rec.latency_ms, 3),
        "cost_usd": round(rec.cost_usd, 8),
        "key": rec.key,
    }


class Telemetry:
    """The recent-traffic window and what reads it: the deployments history and the alerts."""

    def __init__(self, config: Config) -> None:
        self.window = Window()
        self.history = DeploymentHistory()
        self.notifier = Notifier()
        # Worker 0 of `serve --workers N` notifies what every worker sees alike (alerts.py), and
        # with `shared_state` claims it in Redis first, so that one instance sends it (alert_claims.py).
        worker = workers.current()
        shared = config.shared_state
        self.claims = AlertClaims(shared, self.notifier) if shared is not None else None
        named = shared is not None or (worker is not None and worker.count > 1)
        self.alerts = AlertEngine(self.notifier, worker is None or worker.id == 0, self.claims, named)
        # The loop it runs on, kept while it runs: asking for the running loop is a getpid()
        # system call on Python 3.11, and `finished` needs it once a request.
        self.loop: asyncio.AbstractEventLoop | None = None
        # `POST /admin/alerts/test` calls by caller (ALERT_TESTS_PER_MINUTE), shared in Redis with `shared_state`
        self.tests = WriteLimit(shared, "alert_tests")

    def tick(self, app: web.Application, now: float, sample: bool, budgets: list[tuple[Budget, float]] | None) -> None:
        """`budgets`: their spend when the alerts are due (else None)."""
        state = app[STATE]
        live = state.live
        self.window.add_shed(state.counters.shed, now)
        if sample:
            self.history.sample(live, self.window, now)
        if budgets is not None:
            self.alerts.evaluate(live.config.alerts, live, self.window, budgets, now)


TELEMETRY = web.AppKey("telemetry", Telemetry)


def _traced(rec: RequestRecord) -> RequestRecord:
    """The record as its spans show it: the asked model redacted, and a request no route served
    under the route `(unrouted)`, so its span is `chat (unrouted)` whatever model the client
    made up (span names must be few), the model kept in `gen_ai.request.model`."""
    model = redact.text(rec.model)
    if rec.route and model == rec.model:
        return rec
    shown = copy.copy(rec)  # the request log and the ledger keep the record as it is
    shown.model, shown.route = model, rec.route or UNROUTED
    return shown


def observe_now(app: web.Application, rec: RequestRecord, reasons: list[str]) -> None:
    """What `finished` schedules (also called directly by the telemetry cost benchmark)."""
    app[METRICS].observe(rec)
    app[TELEMETRY].window.add(rec, time.time())
    if rec.trace is not None and (tracer := app.get(TRACER)) is not None:
        tracer.record(_traced(rec), app[STATE].live)
    if DECISIONS.isEnabledFor(logging.INFO):
        # The fields are the line (JSON in either log format; see `logs`).
        DECISIONS.info("request finished", extra={"fields": decision_fields(rec, reasons)})


def finished(app: web.Application, rec: RequestRecord, reasons: list[str]) -> None:
    """Observes a finished request on the next loop turn (its context, hence its request id, kept)."""
    (app[TELEMETRY].loop or asyncio.get_running_loop()).call_soon(observe_now, app, rec, reasons)


async def _run(app: web.Application) -> None:
    """Samples the history at each slot boundary and evaluates alerts every `alerts.interval_s`."""
    t = app[TELEMETRY]
    if t.claims is not None:  # before the first evaluation: what fired before this process
        try:
            if taken := t.alerts.adopt(await t.claims.firing(), app[STATE].live.config.alerts):
                log.info("alerts: %d shared alert(s) firing before this start taken up", taken)
        except redis_client.errors() as e:
            log.warning("alerts: cannot read the shared alerts firing (%s)", type(e).__name__)
    last_eval = last_slot = 0.0
    while True:
        every = app[STATE].live.config.alerts.interval_s
        step = min(every, SLOT_S)
        await asyncio.sleep(step - time.time() % step + 0.01)
        now = time.time()
        slot = now - now % SLOT_S
        sample, evaluate = slot > last_slot, now - last_eval >= every - 0.05
        try:
            budgets = None
            if evaluate:  # the budgets as admission counts them, for the alerts and the gauges
                budgets = await budget_spend_now(app.get(ADMISSION), app[STATE].live, now)
                app[METRICS].shared_budgets = budgets
            t.tick(app, now, sample, budgets)
        except Exception:
            log.exception("telemetry sampling failed")  # the next tick tries again
        last_slot = slot
        if evaluate:
            last_eval = now


async def _background(app: web.Application) -> AsyncIterator[None]:
    t = app[TELEMETRY]
    t.loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(_run(app)), asyncio.create_task(t.notifier.run())]
    yield
    t.loop = None
    tasks[0].cancel()  # no new evaluation; what was notified goes out, within a bound
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[0]
    try:
        async with asyncio.timeout(notify.FLUSH_AT_EXIT_S):
            if t.claims is not None:
                await t.claims.flush()
            await t.notifier.flush()
    except TimeoutError:
        log.warning("%d alert notification(s) not sent: the server stopped first", t.notifier.pending())
    tasks[1].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[1]
    if t.claims is not None:
        await t.claims.close()
    await t.tests.close()


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    yield
    tracer = app.get(TRACER)
    if tracer is not None:  # sends what is queued, within the export timeout, off the loop
        await asyncio.to_thread(tracer.shutdown)


def _trace_source(app: web.Application) -> Iterable[Metric]:
    tracer = app.get(TRACER)
    if tracer is None:
        return
    spans = CounterMetricFamily(
        "edgeroute_trace_spans", "Trace spans by result: exported, failed (export) or dropped (queue full).",
        labels=["result"],
    )  # fmt: skip
    for result, n in (("exported", tracer.exporter.exported), ("failed", tracer.exporter.failed)):
        spans.add_metric([result], n)
    spans.add_metric(["dropped"], tracer.dropped)
    yield spans


def _alert_source(app: web.Application) -> Iterable[Metric]:
    t = app[TELEMETRY]
    firing = GaugeMetricFamily("edgeroute_alerts_firing", "In-process alerts firing now.", labels=["severity"])
    for sev in ("info", "warning", "critical"):
        firing.add_metric([sev], sum(a.severity == sev for a in t.alerts.firing.values()))
    yield firing
    sent = CounterMetricFamily(
        "edgeroute_alert_notifications", "Alert notifications by webhook and result.", labels=["webhook", "result"]
    )
    for result, counts in (("sent", t.notifier.sent), ("failed", t.notifier.failed)):
        for name, n in counts.items():
            sent.add_metric([name, result], n)
    yield sent
    yield CounterMetricFamily(
        "edgeroute_alert_notifications_dropped",
        "Alert notifications dropped because the webhook queue was full.",
        value=t.notifier.dropped,
    )
    if t.claims is not None:
        yield from t.claims.metrics()


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _only(request: web.Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        name = unknown[0][:40]
        takes = ", ".join(repr(a) for a in sorted(allowed)) or "no parameters"
        raise ProxyError(400, f"Unknown parameter {name!r}; this endpoint takes {takes}.", param=name)


async def admin_alerts(request: web.Request) -> web.Response:
    _only(request, set())
    return _json(request.app[TELEMETRY].alerts.listing())


# Test notifications a caller may ask for a minute, on every instance sharing Redis together
# (a token bucket, so a few at once): each one pages every on-call channel named, and writes an audit entry.
ALERT_TESTS_PER_MINUTE = 3


async def admin_alerts_test(request: web.Request) -> web.Response:
    """Queues a test notification to every webhook, or to `?webhook=NAME`; 429 past
    ALERT_TESTS_PER_MINUTE calls a minute by the caller. A probe for an unknown webhook pages no
    one but counts too: it writes an audit entry, and the audit is not the caller's to fill."""
    _only(request, {"webhook"})
    cfg = request.app[STATE].live.config.alerts
    name = request.query.get("webhook")
    gov = request.app.get(GOV)
    unknown = name is not None and name not in cfg.webhooks
    names = [name] if name is not None else list(cfg.webhooks)
    if names and (wait := await request.app[TELEMETRY].tests.take(actor_of(request), ALERT_TESTS_PER_MINUTE)) > 0:
        raise too_many(
            f"Too many test notifications: at most {ALERT_TESTS_PER_MINUTE} a minute per caller "
            "(each one pages every webhook it names).",
            "alerts_test_rate_limited",
            wait,
        )
    if unknown:
        assert name is not None
        if gov is not None:  # who probed for which webhook, and that none was sent
            shown = redact.text(name[:80])
            await gov.audit(actor_of(request), "alerts.test_refused", "alerts", None, {"webhook": shown, "queued": []})
        raise ProxyError(404, f"No webhook {name[:80]!r} in alerts.webhooks.", code="not_found", param="webhook")
    request.app[TELEMETRY].alerts.test(cfg, names, time.time())
    if gov is not None:  # a notification sent to every on-call channel in the operator's name
        await gov.audit(actor_of(request), "alerts.test", "alerts", None, {"queued": names})
    if not names:  # `{"queued": []}` alone read as if a test had been sent somewhere
        return _json({"queued": [], "note": "no webhook is configured (alerts.webhooks): no test was sent"})
    return _json({"queued": names})


async def admin_deployments_history(request: web.Request) -> web.Response:
    _only(request, {"since"})
    since = parse_since(request.query.get("since"), time.time())
    hist = request.app[TELEMETRY].history
    return _json({"interval_s": hist.interval_s, "deployments": hist.since(since)})


def install(app: web.Application, config: Config) -> None:
    """Metrics, the recent-traffic window, alerts and history, tracing when on, their routes and tasks."""
    app[METRICS] = Metrics()
    app[TELEMETRY] = Telemetry(config)

    def mirrored(rec: RequestRecord) -> None:  # a shadow mirror: paid for, so in the cost metric and alerts
        app[METRICS].observe_mirror(rec)
        app[TELEMETRY].window.add(rec, time.time(), mirror=True)

    app[MIRRORED] = mirrored
    app[METRICS].sources += [_alert_source, _trace_source]
    if config.tracing.enabled:
        tracing.start(app, config.tracing)
        app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_background)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/admin/alerts", admin_alerts)
    app.router.add_post("/admin/alerts/test", admin_alerts_test)
    app.router.add_get("/admin/deployments/history", admin_deployments_history)
