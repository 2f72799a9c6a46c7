"""The spans of traced requests, built with OpenTelemetry's SDK and exported by OTLP/HTTP.

Imported only when `tracing.enabled` (by `tracing.start`): the SDK and the OTLP exporter
weigh about 10 MB and a tenth of a second at start, which a proxy without tracing does
not pay. The spans are built after the request, from its records, with their real start
and end times: the request (SERVER), the routing decision, each upstream attempt (CLIENT)
and, for a stream, its relay. They carry OpenTelemetry's GenAI semantic-convention
attributes (`gen_ai.*`) and edgeroute's own (`edgeroute.*`).

The event loop only queues a traced request (`record`, an append); a builder thread
turns the queue into spans every 50 ms (about 0.1 ms of CPU per request, which on the
loop was a stall in the tail) and export runs in the SDK's batch processor thread. At
most `max_queue` spans wait for them; beyond that a trace is dropped and counted, so an
unreachable collector never slows or fails a request and never grows memory.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import requests
import urllib3
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from edgeroute import secrets
from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.background import lower_priority
from edgeroute.config import Config
from edgeroute.state import Live
from edgeroute.telemetry import otlp
from edgeroute.telemetry.settings import Tracing as TracingSettings
from edgeroute.telemetry.trace_context import (
    TraceContext,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    valid_tracestate,
)

# `gen_ai.system` by provider kind (OpenTelemetry's well-known values).
GEN_AI_SYSTEM = {
    "openai": "openai",
    "openai_compatible": "openai",
    "azure": "az.ai.openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "bedrock": "aws.bedrock",
}
_SCOPE = InstrumentationScope("edgeroute")
log = logging.getLogger("edgeroute.tracing")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# How often the builder thread turns queued requests into spans (the processor batches them
# again for export): a traced request costs the event loop an append, not ~0.1 ms of building.
_BUILD_EVERY_S = 0.05
_COLLECTOR_BODY_BYTES = 64 * 1024  # a longer (or unannounced) answer is not read
_BODY_WITHIN_S = 10.0  # an answer's body comes within its request's timeout (this, without one)


def _ns(t: float) -> int:
    return int(t * 1e9)


class _StatusOnly(requests.Session):
    """A collector's answer is its status; its body is read only when it says it is small.
    The exporter read it whole: a collector answering 200 and then streaming without end
    (hostile or broken; each read came within the timeout) held the export thread for good,
    the body growing in memory."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        resp = super().request(*args, **{**kwargs, "stream": True})
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= _COLLECTOR_BODY_BYTES:
            timeout = kwargs.get("timeout")
            body = _read_within(resp, timeout if isinstance(timeout, int | float) else _BODY_WITHIN_S)
            if body is not None:  # read now, as requests does (OTLP's answers are small): the connection is kept
                resp._content = body
                return resp
        resp._content = b""  # as if read: the exporter's `text` and `content` see an empty body
        resp.close()  # left unread, the connection is closed rather than reused
        return resp


def _read_within(resp: requests.Response, seconds: float) -> bytes | None:
    """The answer's body, or None when it did not come whole within `seconds` (give or take one
    read's timeout). Its length announced, a body trickled a byte per read timeout held the export
    thread for hours (every later span dropped), as requests reads it to its end."""
    deadline = time.monotonic() + seconds
    body = bytearray()
    with contextlib.suppress(requests.RequestException, OSError, urllib3.exceptions.HTTPError):
        while chunk := resp.raw.read1(_COLLECTOR_BODY_BYTES, decode_content=True):
            body += chunk
            if len(body) > _COLLECTOR_BODY_BYTES or time.monotonic() > deadline:
                return None
        return bytes(body)
    return None


class _CountingExporter(SpanExporter):
    """Counts what the wrapped exporter sent and failed, so that the queue can be bounded."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self._failing = False
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        ok = result is SpanExportResult.SUCCESS
        with self._lock:
            if ok:
                self.exported += len(spans)
            else:
                self.failed += len(spans)
            changed, self._failing = self._failing == ok, not ok
        if changed:
            if ok:
                log.warning("trace export works again")
            else:
                log.warning("trace export fails; spans are lost and counted in edgeroute_trace_spans_total")
        return result

    def lost(self, n: int) -> None:
        """Spans counted as submitted that were never built (counted as failed)."""
        if n > 0:
            with self._lock:
                self.failed += n

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Tracer:
    """Sampling, context propagation and span building for one application."""

    def __init__(self, cfg: TracingSettings, exporter: SpanExporter | None = None, builder: bool = True) -> None:
        """`builder=False`: no builder thread, spans are built by calling `build()` (benchmarks)."""
        self.ratio = cfg.sample_ratio
        self.max_queue = cfg.max_queue
        self.resource = Resource.create({"service.name": cfg.service_name})
        if exporter is None:
            headers = {k: secrets.resolve(v).reveal() for k, v in cfg.headers.items()}
            exporter = otlp.Exporter(
                endpoint=cfg.endpoint, headers=headers, timeout=cfg.timeout_s, session=_StatusOnly()
            )
        self.exporter = _CountingExporter(exporter)
        # The SDK logs every failed batch and retry: an unreachable collector would flood the log.
        # Failures are counted instead, and logged once each time exports start or stop failing.
        for name in ("opentelemetry.exporter", "opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.processor = BatchSpanProcessor(
            self.exporter,
            max_queue_size=cfg.max_queue * 2,  # never reached: `record` drops first, and counts it
            max_export_batch_size=min(512, cfg.max_queue),
            schedule_delay_millis=cfg.flush_interval_s * 1000,
            export_timeout_millis=cfg.timeout_s * 1000,
        )
        self.submitted = 0
        self.dropped = 0
        self._queue: collections.deque[tuple[RequestRecord, Config]] = collections.deque()
        self._building = threading.Lock()  # the thread, or `force_flush` / `shutdown`
        self._stop = threading.Event()
        self._builder = threading.Thread(target=self._run, name="edgeroute-spans", daemon=True)
        if builder:
            self._builder.start()

    # -- on the request path -------------------------------------------------------------------

    def begin(self, headers: Mapping[str, str]) -> TraceContext | None:
        """The request's trace context, or None when it is neither traced nor part of a trace."""
        raw = headers.get("traceparent")
        parent = parse_traceparent(raw)
        if parent is None:
            if random.random() >= self.ratio:
                return None
            return TraceContext(new_trace_id(), new_span_id(), 0, True)
        trace_id, parent_id, sampled = parent
        state = valid_tracestate(headers.get("tracestate"))
        if not sampled:
            # Re-written, not relayed: a future version may carry any text after the flags.
            return TraceContext(trace_id, 0, parent_id, False, f"00-{trace_id}-{parent_id:016x}-00", state)
        return TraceContext(trace_id, new_span_id(), parent_id, True, None, state)

    # -- after the request ---------------------------------------------------------------------

    def record(self, rec: RequestRecord, live: Live) -> None:
        """Queues a traced request for its spans (an append: they are built in the builder thread)."""
        ctx = rec.trace
        if ctx is None or not ctx.sampled:
            return
        pending = self.submitted - self.exporter.exported - self.exporter.failed
        n = _span_count(rec)
        if pending + n > self.max_queue:
            self.dropped += n
            return
        self.submitted += n
        self._queue.append((rec, live.config))

    # -- in the builder thread -----------------------------------------------------------------

    def _run(self) -> None:
        lower_priority()  # building spans waits for the loop, never the other way round
        while not self._stop.wait(_BUILD_EVERY_S):
            self.build()

    def build(self) -> None:
        """Builds the queued requests' spans and hands them to the exporter's processor."""
        with self._building:
            while self._queue:
                rec, cfg = self._queue.popleft()
                try:
                    spans = self._spans(rec, rec.trace, cfg)  # type: ignore[arg-type]  # queued only when set
                except Exception:  # a bug must not stop the builder; the trace is lost, and counted
                    log.exception("building the spans of request %s failed", rec.request_id)
                    spans = []
                for span in spans:
                    self.processor.on_end(span)
                # What `record` counted but was not built never reaches the exporter: count it
                # as failed, or the queue's bound would shrink for good.
                self.exporter.lost(_span_count(rec) - len(spans))

    def _spans(self, rec: RequestRecord, ctx: TraceContext, cfg: Config) -> list[ReadableSpan]:
        trace_id = int(ctx.trace_id, 16)
        root = SpanContext(trace_id, ctx.span_id, is_remote=False, trace_flags=_SAMPLED)
        parent = SpanContext(trace_id, ctx.parent_span_id, is_remote=True, trace_flags=_SAMPLED)
        start = rec.started_at
        end = start + rec.latency_ms / 1000
        dep = cfg.deployments.get(rec.deployment or "")
        served = rec.attempts[-1] if rec.attempts else None
        for a in rec.attempts:
            if a.deployment == rec.deployment and a.outcome == "success":
                served = a
        provider = cfg.providers.get(served.provider) if served is not None else None
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": rec.model,
            "edgeroute.request_id": rec.request_id,
            "edgeroute.route": rec.route,
            "edgeroute.cost_usd": rec.cost_usd,
            "edgeroute.attempts": len(rec.attempts),
            "edgeroute.outcome": rec.outcome,
            "http.response.status_code": rec.status,
        }
        if provider is not None:
            attrs["gen_ai.system"] = GEN_AI_SYSTEM.get(provider.kind, provider.kind)
        if dep is not None:
            attrs["gen_ai.response.model"] = dep.model
            attrs["edgeroute.deployment"] = rec.deployment
        _usage(attrs, rec.usage)
        for k, v in (("edgeroute.rule", rec.rule), ("edgeroute.task", rec.task), ("error.type", rec.error_class)):
            if v is not None:
                attrs[k] = v
        if rec.ttft_ms is not None:
            attrs["edgeroute.ttft_ms"] = rec.ttft_ms
        failed = rec.status >= 500 or rec.status == 0
        out = [
            self._span(f"chat {rec.route or rec.model}", root, parent if ctx.parent_span_id else None,
                       SpanKind.SERVER, start, end, attrs, failed),
        ]  # fmt: skip
        first = min((a.started_at for a in rec.attempts if a.started_at), default=end)
        decision = {"edgeroute.route": rec.route, "gen_ai.request.model": rec.model}
        if rec.rule is not None:
            decision["edgeroute.rule"] = rec.rule
        out.append(self._child("edgeroute.route", trace_id, root, SpanKind.INTERNAL, start, first, decision))
        for a in rec.attempts:
            out.append(self._attempt(a, trace_id, root, cfg))
        if rec.stream and rec.ttft_ms is not None:
            relay_start = start + rec.ttft_ms / 1000
            relay = {"edgeroute.deployment": rec.deployment or "", "edgeroute.outcome": rec.outcome}
            out.append(self._child("edgeroute.relay", trace_id, root, SpanKind.INTERNAL, relay_start, end, relay))
        return out

    def _attempt(self, a: AttemptRecord, trace_id: int, root: SpanContext, cfg: Config) -> ReadableSpan:
        dep = cfg.deployments.get(a.deployment)
        provider = cfg.providers.get(a.provider)
        model = dep.model if dep is not None else a.deployment
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "edgeroute.deployment": a.deployment,
            "edgeroute.provider": a.provider,
            "edgeroute.attempt.kind": a.kind,
            "edgeroute.outcome": a.outcome,
            "edgeroute.cost_usd": a.cost_usd,
        }
        if provider is not None:
            attrs["gen_ai.system"] = GEN_AI_SYSTEM.get(provider.kind, provider.kind)
        if a.status is not None:
            attrs["http.response.status_code"] = a.status
        if a.outcome == "success":
            attrs["gen_ai.response.model"] = model
        else:
            attrs["error.type"] = a.outcome
        if a.ttft_ms is not None:
            attrs["edgeroute.ttft_ms"] = a.ttft_ms
        _usage(attrs, a.usage)
        span_id = a.span_id or new_span_id()
        ctx = SpanContext(trace_id, span_id, is_remote=False, trace_flags=_SAMPLED)
        start = a.started_at
        failed = a.outcome not in ("success", "cancelled")
        return self._span(
            f"chat {model}", ctx, root, SpanKind.CLIENT, start, start + a.latency_ms / 1000, attrs, failed
        )

    def _child(
        self,
        name: str,
        trace_id: int,
        root: SpanContext,
        kind: SpanKind,
        start: float,
        end: float,
        attrs: dict[str, Any],
    ) -> ReadableSpan:
        ctx = SpanContext(trace_id, new_span_id(), is_remote=False, trace_flags=_SAMPLED)
        return self._span(name, ctx, root, kind, start, max(start, end), attrs, False)

    def _span(
        self, name: str, ctx: SpanContext, parent: SpanContext | None, kind: SpanKind,
        start: float, end: float, attrs: dict[str, Any], failed: bool,
    ) -> ReadableSpan:  # fmt: skip
        return ReadableSpan(
            name, ctx, parent, self.resource, attrs, kind=kind,
            status=Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET),
            start_time=_ns(start), end_time=_ns(end), instrumentation_scope=_SCOPE,
        )  # fmt: skip

    def force_flush(self) -> None:
        """Builds and exports everything queued so far (tests, shutdown)."""
        self.build()
        self.processor.force_flush()

    def shutdown(self) -> None:
        """Builds and exports what is queued (bounded by the export timeout), then stops the threads."""
        self._stop.set()
        if self._builder.is_alive():
            self._builder.join(timeout=5)
        self.build()
        self.processor.shutdown()  # type: ignore[no-untyped-call]


def _span_count(rec: RequestRecord) -> int:
    """How many spans `Tracer._spans` builds for `rec`: request, decision, attempts, relay."""
    return 2 + len(rec.attempts) + (rec.stream and rec.ttft_ms is not None)


def _usage(attrs: dict[str, Any], usage: Usage | None) -> None:
    if usage is not None:
        attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
