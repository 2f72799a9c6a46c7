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
import logging

from aiohttp import web

from edgeroute.accounting import RequestRecord
from edgeroute.metrics import METRICS, Metrics, metrics_endpoint

# The decision log: off unless `server.decision_log` (then one line per request).
DECISIONS = logging.getLogger("edgeroute.decisions")


def decision_fields(rec: RequestRecord, reasons: list[str]) -> dict[str, object]:
    """What was decided for a request and how it went; ids and numbers only, no prompt, no key."""
    return {
        "request_id": rec.request_id,
        "model": rec.model,
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


def _observe(app: web.Application, rec: RequestRecord, reasons: list[str]) -> None:
    app[METRICS].observe(rec)
    if DECISIONS.isEnabledFor(logging.INFO):
        # The fields are the line (JSON in either log format; see `logs`).
        DECISIONS.info("request finished", extra={"fields": decision_fields(rec, reasons)})


def finished(app: web.Application, rec: RequestRecord, reasons: list[str]) -> None:
    """Observes a finished request on the next loop turn (its context, hence its request id, kept)."""
    asyncio.get_running_loop().call_soon(_observe, app, rec, reasons)


def install(app: web.Application) -> None:
    """Metrics (and their endpoint) for a new application."""
    app[METRICS] = Metrics()
    app.router.add_get("/metrics", metrics_endpoint)
