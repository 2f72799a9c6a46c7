"""Requests that reach no upstream (`/v1/route/explain`, `/v1/messages/count_tokens`): each is
counted against its key's requests-per-minute limit before its body is read, and observed as
a chat request is: in `/metrics` (`edgeroute_requests_total` with its status and outcome,
`edgeroute_request_errors_total` with its error class) and in the alerts' window, answered or
refused (counted only when refused, a key's 429s there were a share of the chat requests
alone, and `rate_limited_rate` fired on a few). No route is decided for them (that is what
the limit spares), so their `route` (and `model`) is the endpoint's path, a fixed string. A
refusal is recorded as a refused chat request is (the request log, `/admin/requests` and
`/admin/stats`; the ledger at no cost), without its body; an answered one spends nothing and
is not recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from aiohttp import web

from edgeroute import headers
from edgeroute.accounting import RequestRecord
from edgeroute.admission import ADMISSION
from edgeroute.cost.keys import IDENTITY
from edgeroute.errors import ProxyError
from edgeroute.request_input import new_request_id
from edgeroute.state import RECORDER
from edgeroute.telemetry import app as telemetry


@contextlib.asynccontextmanager
async def counted(request: web.Request, endpoint: str) -> AsyncIterator[None]:
    """Counts the request against its key's RPM, then serves it (the body of the `with`); it is
    observed under `endpoint` as it ends, and a refusal (429) recorded too, then raised to the
    client as it was."""
    started = time.perf_counter()
    app = request.app
    rec = RequestRecord(request_id=new_request_id(), started=time.time(), model=endpoint, route=endpoint)
    if (ident := request.get(IDENTITY)) is not None:
        rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
    try:
        await app[ADMISSION].count_request(request)
    except ProxyError as e:
        _failed(rec, e, started)
        e.headers.setdefault(headers.REQUEST_ID, rec.request_id)  # the id it is recorded under
        app[RECORDER].record(rec)
        telemetry.finished(app, rec, [])
        raise
    try:
        yield
    except ProxyError as e:
        _failed(rec, e, started)
        telemetry.finished(app, rec, [])
        raise
    rec.status, rec.outcome = 200, "ok"
    rec.latency_ms = (time.perf_counter() - started) * 1000
    telemetry.finished(app, rec, [])


def _failed(rec: RequestRecord, e: ProxyError, started: float) -> None:
    rec.status, rec.error_class = e.status, e.code or e.type
    rec.outcome = "rate_limited" if e.status == 429 else "error"
    rec.latency_ms = (time.perf_counter() - started) * 1000
