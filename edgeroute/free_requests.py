"""Requests that reach no upstream (`/v1/route/explain`, `/v1/messages/count_tokens`): each is
counted against its key's requests-per-minute limit before its body is read, and a refusal
there is observed as a chat request's is: in `/metrics` (`edgeroute_requests_total` with its
status and outcome, `edgeroute_request_errors_total` with its error class) and in the alerts'
window (`rate_limited`). No route is decided for them (that is what the limit spares), so
their `route` label is the endpoint's path, a fixed string. They are not recorded in the
ledger or the request log: they spend nothing.
"""

from __future__ import annotations

import time

from aiohttp import web

from edgeroute.accounting import RequestRecord
from edgeroute.admission import ADMISSION
from edgeroute.cost.keys import IDENTITY
from edgeroute.errors import ProxyError
from edgeroute.request_input import new_request_id
from edgeroute.telemetry import app as telemetry


async def count(request: web.Request, endpoint: str) -> None:
    """Counts the request against its key's RPM; a refusal (429) is observed under `endpoint`,
    then raised to the client as it was."""
    started = time.perf_counter()
    try:
        await request.app[ADMISSION].count_request(request)
    except ProxyError as e:
        rec = RequestRecord(request_id=new_request_id(), started=time.time(), model="", route=endpoint)
        if (ident := request.get(IDENTITY)) is not None:
            rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
        rec.status, rec.error_class = e.status, e.code or e.type
        rec.outcome = "rate_limited" if e.status == 429 else "error"
        rec.latency_ms = (time.perf_counter() - started) * 1000
        telemetry.finished(request.app, rec, [])
        raise
