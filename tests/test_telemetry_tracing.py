"""Traces: spans built from the records (SDK in-memory exporter), a real OTLP/HTTP receiver
decoding the protobuf, W3C traceparent continued from the client and sent upstream."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.exporter.otlp.proto.http import trace_exporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from edgeroute import config as config_mod
from edgeroute.accounting import MemoryRecorder
from edgeroute.server import create_app
from edgeroute.state import STATE
from edgeroute.telemetry import otlp
from edgeroute.telemetry.spans import Tracer
from edgeroute.telemetry.trace_context import parse_traceparent
from edgeroute.telemetry.tracing import TRACER
from tests.conftest import ProxyTestServer, eventually, simple_config
from tests.metrics_support import scrape
from tests.serve_support import free_port

MSG = [{"role": "user", "content": "hello"}]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
async def serve_app() -> AsyncIterator[Any]:
    servers: list[TestServer | ProxyTestServer] = []

    async def start(app: web.Application) -> str:
        # The proxy as `edgeroute serve` serves it; a receiver on aiohttp's own server.
        server = ProxyTestServer(app) if STATE in app else TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for s in reversed(servers):
        await s.close()


def _config(up: Any, **tracing: Any) -> config_mod.Config:
    cfg = simple_config({"a": up})
    cfg["tracing"] = {"enabled": True, "sample_ratio": 1.0, "flush_interval_s": 0.1, "timeout_s": 1, **tracing}
    return config_mod.parse(cfg, "test.yaml")


def _with_memory_exporter(cfg: config_mod.Config) -> tuple[web.Application, InMemorySpanExporter]:
    """The proxy app with its spans kept in memory (the SDK's exporter for tests)."""
    app = create_app(cfg, "test.yaml", MemoryRecorder())
    app[TRACER].shutdown()
    memory = InMemorySpanExporter()
    app[TRACER] = Tracer(cfg.tracing, memory)
    return app, memory


async def test_spans_from_the_records(start_upstream, serve_app) -> None:
    up = await start_upstream(record=True)
    app, memory = _with_memory_exporter(_config(up))
    url = await serve_app(app)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    header = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=MSG, extra_headers={"traceparent": header, "tracestate": "vendor=1"}
    )
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    async for _ in stream:
        pass
    await client.close()
    app[TRACER].force_flush()
    spans = memory.get_finished_spans()
    by_trace: dict[int, list[Any]] = {}
    for s in spans:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    assert len(by_trace) == 2
    # The first request continued the client's trace.
    first = by_trace.pop(int(CLIENT_TRACE, 16))
    names = sorted(s.name for s in first)
    assert names == ["chat gpt-4o-mini", "chat m", "edgeroute.route"]
    root = next(s for s in first if s.kind is SpanKind.SERVER)
    assert root.parent is not None and root.parent.span_id == int(CLIENT_PARENT, 16) and root.parent.is_remote
    a = root.attributes
    assert a["gen_ai.system"] == "openai" and a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == "gpt-4o-mini" and a["edgeroute.deployment"] == "d-a"
    assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
    assert a["edgeroute.cost_usd"] > 0 and a["edgeroute.route"] == "m"
    assert a["edgeroute.request_id"] == raw.headers["x-request-id"]
    assert a["http.response.status_code"] == 200
    attempt = next(s for s in first if s.kind is SpanKind.CLIENT)
    assert attempt.parent is not None and attempt.parent.span_id == root.context.span_id
    assert attempt.attributes["edgeroute.attempt.kind"] == "first"
    assert root.start_time <= attempt.start_time <= attempt.end_time <= root.end_time
    # The upstream was called with a traceparent naming the attempt's span in the same trace.
    sent = up.options.requests[0]["headers"]
    trace_id, span_id, sampled = parse_traceparent(sent["traceparent"])  # type: ignore[misc]
    assert (trace_id, span_id, sampled) == (CLIENT_TRACE, attempt.context.span_id, True)
    assert sent["tracestate"] == "vendor=1"
    # The stream: a new trace (sampled by the ratio), with the relay span.
    (second,) = by_trace.values()
    assert sorted(s.name for s in second) == ["chat gpt-4o-mini", "chat m", "edgeroute.relay", "edgeroute.route"]
    assert all(s.status.status_code is not StatusCode.ERROR for s in second)


async def test_not_sampled_forwards_the_clients_context_only(start_upstream, serve_app) -> None:
    up = await start_upstream(record=True)
    app, memory = _with_memory_exporter(_config(up, sample_ratio=0.0))
    url = await serve_app(app)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(model="m", messages=MSG)
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00"
    await client.chat.completions.create(model="m", messages=MSG, extra_headers={"traceparent": unsampled})
    await client.chat.completions.create(model="m", messages=MSG, extra_headers={"traceparent": "00-zz-bad-01"})
    await client.close()
    app[TRACER].force_flush()
    assert memory.get_finished_spans() == ()
    sent = [r["headers"].get("traceparent") for r in up.options.requests]
    assert sent == [None, unsampled, None]


async def test_spans_are_built_off_the_event_loop(start_upstream, serve_app, monkeypatch) -> None:
    """The loop only queues a traced request; its spans are built in the builder thread."""
    built_in: list[str] = []
    build = Tracer._spans

    def spy(self: Tracer, *args: Any) -> Any:
        built_in.append(threading.current_thread().name)
        return build(self, *args)

    monkeypatch.setattr(Tracer, "_spans", spy)
    up = await start_upstream()
    app, memory = _with_memory_exporter(_config(up))
    url = await serve_app(app)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(model="m", messages=MSG)
    await client.close()
    for _ in range(100):
        if len(built_in) == 3:
            break
        await asyncio.sleep(0.05)
    assert built_in == ["edgeroute-spans"] * 3
    app[TRACER].force_flush()
    assert len(memory.get_finished_spans()) == 9  # request, decision and attempt, three times


class OtlpReceiver:
    """An OTLP/HTTP trace receiver: decodes each protobuf export request."""

    def __init__(self, expect: int) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.expect = expect
        self.enough = asyncio.Event()

    def app(self) -> web.Application:
        async def traces(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            msg = ExportTraceServiceRequest()
            msg.ParseFromString(await request.read())
            for rs in msg.resource_spans:
                self.resources.append({kv.key: kv.value.string_value for kv in rs.resource.attributes})
                for ss in rs.scope_spans:
                    self.spans += list(ss.spans)
            if len(self.spans) >= self.expect:
                self.enough.set()
            return web.Response(body=b"", content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        return app


async def test_export_to_an_otlp_http_receiver(start_upstream, serve_app, monkeypatch) -> None:
    def sdk_encoder(spans: Any) -> Any:
        raise AssertionError("the SDK's encoder was called")

    # Encoded by edgeroute (`telemetry.otlp`): the SDK's encoder built a protobuf object per
    # attribute, 81 µs of CPU a traced request in a thread sharing the GIL with the event loop.
    monkeypatch.setattr(trace_exporter, "encode_spans", sdk_encoder)
    monkeypatch.setattr(otlp, "encode_spans", sdk_encoder)
    receiver = OtlpReceiver(expect=9)  # request, decision, attempt for each of three requests
    endpoint = await serve_app(receiver.app())
    up = await start_upstream()
    cfg = _config(up, endpoint=endpoint + "/v1/traces", service_name="edge-test")
    url = await serve_app(create_app(cfg, "test.yaml", MemoryRecorder()))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(model="m", messages=MSG)
    await client.close()
    await asyncio.wait_for(receiver.enough.wait(), 10)
    assert len(receiver.spans) == 9
    assert {r["service.name"] for r in receiver.resources} == {"edge-test"}
    server_spans = [s for s in receiver.spans if s.kind == s.SPAN_KIND_SERVER]
    assert len(server_spans) == 3 and len({s.trace_id for s in server_spans}) == 3
    attrs = {kv.key: kv.value for kv in server_spans[0].attributes}
    assert attrs["gen_ai.request.model"].string_value == "m"
    assert attrs["gen_ai.usage.output_tokens"].int_value > 0
    assert attrs["edgeroute.cost_usd"].double_value > 0
    for _ in range(50):  # the exporter counts a batch once its answer is read, just after the receiver got it
        m = await scrape(url)
        if m.value("edgeroute_trace_spans_total", result="exported") == 9:
            break
        await asyncio.sleep(0.1)
    assert m.value("edgeroute_trace_spans_total", result="exported") == 9


async def test_unreachable_collector_never_slows_requests(start_upstream, serve_app) -> None:
    up = await start_upstream()
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    cfg = _config(up, endpoint=dead, max_queue=6, flush_interval_s=0.05)
    url = await serve_app(create_app(cfg, "test.yaml", MemoryRecorder()))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    t0 = time.perf_counter()
    for _ in range(20):
        await client.chat.completions.create(model="m", messages=MSG)
    elapsed = time.perf_counter() - t0
    await client.close()
    assert elapsed < 10  # twenty loopback answers; a blocked export would take a second each
    await asyncio.sleep(0.3)
    m = await scrape(url)
    lost = m.value("edgeroute_trace_spans_total", result="failed") or 0
    dropped = m.value("edgeroute_trace_spans_total", result="dropped") or 0
    assert m.value("edgeroute_trace_spans_total", result="exported") == 0
    assert dropped > 0  # the queue is bounded: what does not fit is dropped and counted
    assert lost + dropped <= 60


def test_opentelemetry_is_loaded_only_when_tracing_is_on() -> None:
    """A proxy with tracing off never imports OpenTelemetry (about 10 MB and 0.15 s at start)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from edgeroute import config\n"
        "from edgeroute.accounting import MemoryRecorder\n"
        "from edgeroute.server import create_app\n"
        "cfg = {'providers': {'p': {'base_url': 'http://127.0.0.1:9/v1'}},\n"
        "       'deployments': {'d': {'provider': 'p', 'model': 'x'}}, 'models': {'m': {'deployments': ['d']}},\n"
        "       'tracing': {'enabled': sys.argv[1] == 'on'}}\n"
        "create_app(config.parse(cfg, 't.yaml'), 't.yaml', MemoryRecorder())\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('opentelemetry')}))\n"
    )
    loaded = {
        state: subprocess.run(
            [sys.executable, "-c", probe, state], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
        for state in ("off", "on")
    }
    assert loaded == {"off": "[]", "on": "['opentelemetry']"}


async def _exported_while_answered(
    serve_app: Any, start_upstream: Any, send: Any, content_length: int | None = None, within: float = 3
) -> None:
    """A traced request's three spans (request, decision, attempt) are counted as exported within
    `within` seconds while the collector still answers: status 200, then `send(resp, ending)`
    writing its body until `ending` is set."""
    received = asyncio.Event()
    ending = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        received.set()
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-protobuf"})
        if content_length is not None:
            resp.content_length = content_length
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await send(resp, ending)
        return resp

    collector = web.Application()
    collector.router.add_post("/v1/traces", answer)
    endpoint = await serve_app(collector)
    up = await start_upstream()
    url = await serve_app(create_app(_config(up, endpoint=endpoint + "/v1/traces"), "test.yaml", MemoryRecorder()))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=MSG)
        await asyncio.wait_for(received.wait(), 10)

        async def exported() -> float | None:
            return (await scrape(url)).value("edgeroute_trace_spans_total", result="exported")

        assert await eventually(exported, "the spans counted as exported", within=within) == 3
    finally:
        ending.set()
        await client.close()


async def test_a_collector_whose_answer_never_ends_holds_no_export(start_upstream, serve_app) -> None:
    """A collector (hostile or broken) that answers 200 and streams its body without end: the
    status is the answer. The exporter read the whole body, which never came: the export
    thread was held for good (every later span dropped) while the body grew in memory."""

    async def endless(resp: web.StreamResponse, ending: asyncio.Event) -> None:
        while not ending.is_set():  # 6 MB/s: bounded for the test's sake, endless for the exporter
            await resp.write(b"\0" * 65536)
            await asyncio.sleep(0.01)

    await _exported_while_answered(serve_app, start_upstream, endless)


async def test_a_collector_that_trickles_its_short_answer_holds_no_export(start_upstream, serve_app) -> None:
    """A collector that announces a short answer (`Content-Length`) and sends it a byte at a
    time, each within the read timeout: its body is waited for the export's timeout (1 s) at
    most. The exporter read it to its end, the export thread held for as long (a thousand bytes
    at 0.2 s: over three minutes), every span meanwhile dropped."""

    async def trickle(resp: web.StreamResponse, ending: asyncio.Event) -> None:
        for _ in range(1000):
            if ending.is_set():
                break
            await resp.write(b"\0")
            await asyncio.sleep(0.2)

    await _exported_while_answered(serve_app, start_upstream, trickle, content_length=1000, within=8)
