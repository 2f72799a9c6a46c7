"""Structured logs: JSON lines or text, the level, the request id on every line of a request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from edgeroute.telemetry import logs
from tests.conftest import simple_config
from tests.serve_support import killed, start_serve
from tests.test_serve import wait_ready


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    decisions = logging.getLogger("edgeroute.decisions")
    d_level = decisions.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    decisions.setLevel(d_level)


async def test_request_id_follows_the_request_into_its_tasks(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("json", "info", stream=out)
    log = logging.getLogger("edgeroute.test")

    async def request(rid: str) -> None:
        logs.bind_request(rid)
        log.info("start")
        await asyncio.sleep(0.01)
        await asyncio.create_task(asyncio.sleep(0))  # a child task inherits the id
        asyncio.get_running_loop().call_soon(log.warning, "later")
        await asyncio.sleep(0.01)

    await asyncio.gather(request("req_a"), request("req_b"))
    log.info("outside")
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    by_msg = {(x["msg"], x.get("request_id")) for x in lines}
    assert by_msg == {
        ("start", "req_a"), ("start", "req_b"), ("later", "req_a"), ("later", "req_b"), ("outside", None)
    }  # fmt: skip
    assert all(x["logger"] == "edgeroute.test" and x["ts"].endswith("Z") for x in lines)


def test_level_and_text_format(restore_logging: None) -> None:
    out = io.StringIO()
    logs.setup("text", "warning", stream=out)
    log = logging.getLogger("edgeroute.test")
    log.info("hidden")
    logs.REQUEST_ID.set("req_t")
    log.warning("shown")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert "hidden" not in text
    assert "WARNING edgeroute.test [req_t]: shown" in text
    assert "ValueError: boom" in text
    # A second set-up replaces the first handler (no duplicated lines).
    out2 = io.StringIO()
    logs.setup("json", "error", stream=out2)
    log.warning("now hidden")
    log.error("once")
    assert "once" not in out.getvalue()
    assert [json.loads(x)["msg"] for x in out2.getvalue().splitlines()] == ["once"]


async def test_serve_json_logs_with_decision_line(start_upstream, tmp_path: Path) -> None:
    """`edgeroute serve --log-format json --log-level info`: every stderr line is JSON, the
    decision line carries the request id and the decision, and no key appears."""
    up = await start_upstream()
    cfg = simple_config({"a": up}, server={"decision_log": True})
    serving = await start_serve(tmp_path / "c.yaml", cfg, "--log-format", "json", "--log-level", "info")
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        rid = raw.headers["x-request-id"]
        await client.close()
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            assert r.status == 200
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        await killed(proc)
    assert proc.stderr is not None
    text = (await proc.stderr.read()).decode()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]  # every line parses
    decisions = [x for x in lines if x["logger"] == "edgeroute.decisions"]
    assert len(decisions) == 1
    d = decisions[0]
    assert d["request_id"] == rid and d["level"] == "info"
    assert (d["route"], d["deployment"], d["outcome"], d["status"]) == ("m", "d-a", "ok", 200)
    assert "key-a" not in text
