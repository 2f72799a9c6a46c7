"""OpenTelemetry traces of requests, exported by OTLP/HTTP; off unless `tracing.enabled`.

The request path only decides whether a request is traced and carries the trace
context to the upstreams (`begin`, and `TraceContext.inject` per attempt). A W3C
`traceparent` from the client is continued (its sampling decision is followed);
without one, `sample_ratio` decides. The spans are built after the request by
`spans.Tracer`, which is imported only when tracing is on (`start`): with tracing
off, OpenTelemetry is never loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from edgeroute.accounting import RequestRecord
from edgeroute.telemetry.settings import Tracing as TracingSettings

if TYPE_CHECKING:
    from edgeroute.telemetry.spans import Tracer

TRACER: web.AppKey[Tracer] = web.AppKey("tracer")


def start(app: web.Application, cfg: TracingSettings) -> None:
    """Loads OpenTelemetry and gives `app` its tracer (only called when tracing is on)."""
    from edgeroute.telemetry.spans import Tracer

    app[TRACER] = Tracer(cfg)


def begin(request: web.Request, rec: RequestRecord) -> None:
    """Gives a request its trace context when tracing is on (one dict lookup when it is off)."""
    tracer = request.app.get(TRACER)
    if tracer is not None:
        rec.trace = tracer.begin(request.headers)
