"""What telemetry costs per request, in CPU: ``python -m edgeroute.bench.telemetry_cost``.

Measures, in process and without I/O, what the proxy does for each finished request
(metrics and the alert window, on the loop turn after the answer), what a traced
request adds, and what starting a request costs with tracing on (the sampling decision).
A traced request costs the loop an append; its spans are built in the tracer's builder
thread and encoded for export in the exporter's (both reported apart: they share the GIL
with the loop; the export's HTTP is not counted). Records are those of a one-attempt JSON
request with usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edgeroute import config as config_mod
from edgeroute.accounting import AttemptRecord, MemoryRecorder, RequestRecord, Usage
from edgeroute.server import create_app
from edgeroute.telemetry import otlp
from edgeroute.telemetry.app import observe_now
from edgeroute.telemetry.spans import Tracer
from edgeroute.telemetry.trace_context import TraceContext, new_span_id, new_trace_id
from edgeroute.telemetry.tracing import TRACER

_CONFIG = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
    "deployments": {"d-a": {"provider": "p", "model": "gpt-4o-mini"}},
    "models": {"m": {"deployments": ["d-a"]}},
    "tracing": {"enabled": True, "sample_ratio": 0.1, "max_queue": 1_000_000},
}


def _record(traced: bool) -> RequestRecord:
    now = time.time()
    r = RequestRecord("req_1", now, "m", route="m", status=200, outcome="ok", latency_ms=12.0, deployment="d-a")
    r.attempts.append(
        AttemptRecord("d-a", "p", "success", 200, 11.0, usage=Usage(1500, 200), cost_usd=0.0003, started_at=now)
    )
    if traced:
        r.trace = TraceContext(new_trace_id(), new_span_id(), 0, True)
    return r


def _sdk_encoding(spans: Sequence[ReadableSpan]) -> bytes:
    return bytes(encode_spans(spans).SerializePartialToString())


def _per_call_us(fn: object, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - t) / n * 1e6


async def measure(n: int) -> dict[str, float]:
    cfg = config_mod.parse(_CONFIG, "bench.yaml")
    app = create_app(cfg, "bench.yaml", MemoryRecorder())
    app[TRACER].shutdown()
    memory = InMemorySpanExporter()
    app[TRACER] = tracer = Tracer(cfg.tracing, memory, builder=False)
    plain = [_record(False) for _ in range(n)]
    traced = [_record(True) for _ in range(n)]
    it_plain, it_traced = iter(plain), iter(traced)
    out = {
        "finished request, untraced (us)": _per_call_us(lambda: observe_now(app, next(it_plain), []), n),
        "finished request, traced (us)": _per_call_us(lambda: observe_now(app, next(it_traced), []), n),
    }
    t = time.thread_time()
    tracer.build()  # what the builder thread does with them, off the loop
    tracer.processor.force_flush()
    out["its spans, built in the builder thread (us)"] = (time.thread_time() - t) / n * 1e6
    spans = memory.get_finished_spans()
    for what, encode in (("by the SDK's encoder", _sdk_encoding), ("by edgeroute's (otlp.py)", otlp.serialized)):
        t = time.thread_time()
        for i in range(0, len(spans), 512):  # the export batch's size
            encode(spans[i : i + 512])
        out[f"their OTLP encoding for export, {what} (us)"] = (time.thread_time() - t) / n * 1e6
    out["request start with tracing on, no traceparent (us)"] = _per_call_us(lambda: tracer.begin({}), n)
    tracer.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.telemetry_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    a = p.parse_args(argv)
    for what, us in asyncio.run(measure(a.requests)).items():
        print(f"{what:64s} {us:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
