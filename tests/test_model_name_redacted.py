"""The model a client asks for is its own text (redO L1): a key pasted into it is redacted in
the decision log line, the request log and the spans, and a model no route serves gives its
span the one name `chat (unrouted)` (span names must be few), whatever the client made up."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from edgeroute import config as config_mod
from edgeroute.server import create_app
from edgeroute.telemetry import logs
from edgeroute.telemetry.spans import Tracer
from edgeroute.telemetry.tracing import TRACER
from tests.conftest import ProxyTestServer, simple_config
from tests.test_telemetry_logs import restore_logging

__all__ = ["restore_logging"]  # the fixture, used by name

SECRET = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX"
ROOT = "tok-root-0123456789"


@pytest.fixture
def decision_lines(restore_logging: None) -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.setup("json", "warning", decision_log=True, stream=out)
    yield out


async def test_a_key_in_the_model_name_is_redacted_everywhere(
    start_upstream: Any, tmp_path: Path, decision_lines: io.StringIO
) -> None:
    up = await start_upstream()
    cfg_data = simple_config({"a": up})
    cfg_data["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg_data["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    cfg_data["tracing"] = {"enabled": True, "sample_ratio": 1.0, "flush_interval_s": 0.1, "timeout_s": 1}
    cfg = config_mod.parse(cfg_data, "test.yaml")
    app = create_app(cfg, "test.yaml", None)
    app[TRACER].shutdown()
    memory = InMemorySpanExporter()
    app[TRACER] = Tracer(cfg.tracing, memory)
    server = ProxyTestServer(app)
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    hdrs = {"Authorization": f"Bearer {ROOT}"}
    try:
        async with aiohttp.ClientSession(headers=hdrs) as s:
            for model in (f"x {SECRET} y", "made-up-1", "made-up-2"):
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 404, await r.text()
            deadline = time.monotonic() + 15
            while True:
                async with s.get(url + "/admin/requests?limit=10") as r:
                    rows = (await r.json())["data"]
                if len(rows) == 3:
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.1)
        app[TRACER].force_flush()
    finally:
        await server.close()
    models = sorted(row["model"] for row in rows)
    assert models == ["made-up-1", "made-up-2", "x [REDACTED] y"], models
    lines = [json.loads(x) for x in decision_lines.getvalue().splitlines() if '"edgeroute.decisions"' in x]
    assert sorted(x["model"] for x in lines) == ["made-up-1", "made-up-2", "x [REDACTED] y"], lines
    assert SECRET not in decision_lines.getvalue()
    roots = [s for s in memory.get_finished_spans() if s.parent is None or s.parent.is_remote]
    assert sorted(s.name for s in roots) == ["chat (unrouted)"] * 3
    asked = sorted(str(s.attributes["gen_ai.request.model"]) for s in roots)
    assert asked == ["made-up-1", "made-up-2", "x [REDACTED] y"], asked
    assert all(SECRET not in str(s.attributes) for s in memory.get_finished_spans())
