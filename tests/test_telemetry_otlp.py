"""OTLP's protobuf written by edgeroute (`telemetry.otlp`): the same message the SDK's encoder
builds (a real receiver decodes a traced proxy's export: test_telemetry_tracing)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from edgeroute import config as config_mod
from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.telemetry import otlp
from edgeroute.telemetry.spans import Tracer
from edgeroute.telemetry.trace_context import TraceContext, new_span_id, new_trace_id

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _span(name: str, span_id: int, parent: SpanContext | None = None, **kw: Any) -> ReadableSpan:
    ctx = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id, False, _SAMPLED, kw.pop("state", None))
    return ReadableSpan(
        name, ctx, parent, kw.pop("resource", Resource.create({"service.name": "edge"})), kw.pop("attrs", {}),
        kind=kw.pop("kind", SpanKind.INTERNAL), status=kw.pop("status", Status(StatusCode.UNSET)),
        start_time=1_796_549_551_396_070_000, end_time=1_796_549_551_446_660_000,
        instrumentation_scope=kw.pop("scope", InstrumentationScope("edgeroute")), **kw,
    )  # fmt: skip


SPANS = [
    _span(
        "chat m",
        0x00F067AA0BA902B7,
        SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 7, True, _SAMPLED),
        kind=SpanKind.SERVER,
        state=TraceState([("vendor", "x1"), ("other", "y")]),
        attrs={
            "gen_ai.request.model": "m",
            "edgeroute.request_id": "req_" + "a" * 24,
            "edgeroute.cost_usd": 0.0002859,
            "edgeroute.attempts": 0,
            "gen_ai.usage.input_tokens": 1842,
            "http.response.status_code": 200,
            "edgeroute.free": False,
            "edgeroute.cached": True,
            "edgeroute.note": "",
            "edgeroute.zero": 0.0,
            "edgeroute.negative": -5,
            "edgeroute.big": (1 << 63) - 1,
            "edgeroute.unicode": "modèle ✓ 模型",
            "edgeroute.long": "x" * 300,
            "edgeroute.just_long": "y" * 125,
            "edgeroute.thirty_nine": "é" * 39,
            "edgeroute." + "k" * 100: "v" * 30,  # a key and value past one length byte together
        },
    ),
    _span("edgeroute.route", 1 << 63, SpanContext(1, 2, False, _SAMPLED), attrs={"edgeroute.route": "m"}),
    _span("chat gpt-4o", 3, kind=SpanKind.CLIENT, status=Status(StatusCode.ERROR), attrs={"error.type": "timeout"}),
    _span("failed", 4, status=Status(StatusCode.ERROR, "upstream said no")),
    _span("other resource", 5, resource=Resource.create({"service.name": "second", "n": 3})),
    _span("other scope", 6, scope=InstrumentationScope("lib", "1.2", "https://schema", {"a": "b"})),
    _span("no scope", 8, scope=None, kind=SpanKind.PRODUCER),
]


def _same_as_the_sdk(spans: list[ReadableSpan]) -> None:
    ours = ExportTraceServiceRequest.FromString(otlp.serialized(spans))
    assert ours == encode_spans(spans)


def test_the_bytes_decode_to_the_message_the_sdk_builds() -> None:
    _same_as_the_sdk(SPANS)
    _same_as_the_sdk(SPANS[:1])
    _same_as_the_sdk([])
    # Equal resources that are different objects: one group, as the SDK makes.
    _same_as_the_sdk([_span("a", 1), _span("b", 2)])


@pytest.mark.parametrize(
    "odd",
    [
        _span("an event", 9, events=[Event("e", {"k": 1}, 5)]),
        _span("a list", 10, attrs={"tags": ["a", "b"]}),
        _span("past int64", 11, attrs={"n": 1 << 63}),
    ],
    ids=["event", "sequence", "int-past-64-bits"],
)
def test_what_it_does_not_write_the_sdk_encodes(odd: ReadableSpan) -> None:
    with pytest.raises(otlp.Unencodable):
        otlp.encode([*SPANS, odd])
    _same_as_the_sdk([*SPANS, odd])


def test_the_spans_of_every_kind_of_request_encode_as_the_sdk_does() -> None:
    """What the tracer builds from records: a stream (its relay), a failover (a failed attempt),
    a client's context continued (a remote parent, a tracestate), a request no route served."""
    cfg = config_mod.parse(
        {
            "providers": {
                "p": {"base_url": "http://127.0.0.1:9/v1"},
                "a": {"kind": "anthropic", "base_url": "http://127.0.0.1:9", "api_key": "k"},
            },
            "deployments": {"d-a": {"provider": "p", "model": "gpt-4o-mini"}, "d-b": {"provider": "a", "model": "c"}},
            "models": {"m": {"deployments": ["d-a", "d-b"]}},
            "tracing": {"enabled": True},
        },
        "t.yaml",
    )
    tracer = Tracer(cfg.tracing, InMemorySpanExporter(), builder=False)
    now = time.time()
    stream = RequestRecord("req_s", now, "m", route="m", rule="r1", stream=True, status=200, outcome="ok")
    stream.latency_ms, stream.ttft_ms, stream.deployment, stream.usage, stream.task = (
        80.0,
        20.5,
        "d-b",
        Usage(12, 40),
        "c",
    )
    stream.attempts = [
        AttemptRecord("d-a", "p", "timeout", None, 30.0, started_at=now, kind="first"),
        AttemptRecord(
            "d-b",
            "a",
            "success",
            200,
            45.0,
            usage=Usage(12, 40),
            cost_usd=0.01,
            started_at=now + 0.03,
            ttft_ms=15.0,
            kind="fallback",
            span_id=99,
        ),
    ]
    stream.trace = TraceContext(new_trace_id(), new_span_id(), 0x00F067AA0BA902B7, True, None, "vendor=x1")
    unrouted = RequestRecord("req_u", now, "nope", status=404, outcome="error", error_class="model_not_found")
    unrouted.trace = TraceContext(new_trace_id(), new_span_id(), 0, True)

    class Live:
        config = cfg

    for rec in (stream, unrouted):
        tracer.record(rec, Live)  # type: ignore[arg-type]
    tracer.force_flush()
    spans = list(tracer.exporter.inner.get_finished_spans())  # type: ignore[attr-defined]
    assert len(spans) == 7  # request, decision, two attempts, relay; request, decision
    _same_as_the_sdk(spans)
    tracer.shutdown()


def test_text_that_is_not_utf8_is_left_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resource attribute read from the environment with a byte that is not UTF-8 (Python
    decodes it to a lone surrogate): the SDK's encoder drops that attribute and exports the
    rest; edgeroute's raised past its fallback and every batch was lost."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=caf\udce9")
    odd = _span("chat m", 12, resource=Resource.create({"service.name": "edgeroute"}))
    decoded = ExportTraceServiceRequest.FromString(otlp.serialized([*SPANS, odd]))
    assert [s.name for r in decoded.resource_spans for ss in r.scope_spans for s in ss.spans][-1] == "chat m"
