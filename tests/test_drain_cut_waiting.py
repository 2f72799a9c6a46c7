"""A request still waiting on its upstream when the drain ends (`server.drain_timeout`): an
error in its API's format, recorded as the drain's cut. Found by a red team (session 35, redH
F3): it got a bare disconnect when the connection closed (no status, no body), and its record
said `client_gone`, the client's doing, though the server cut it. A stream already started ends
with an error event (`test_dispatch_failover`); one still waiting for its first byte is here."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import eventually, simple_config
from tests.serve_support import killed, start_serve
from tests.test_serve import wait_ready

HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("api", ["openai", "openai-stream", "anthropic"])
async def test_a_request_waiting_at_the_drains_end_gets_an_error_and_is_recorded_cut(
    api: str, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(latency_ms=30_000, record=True)  # answers long after the drain
    cfg = simple_config({"a": up}, server={"drain_timeout": 0.5})
    serving = await start_serve(tmp_path / "c.yaml", cfg, stderr=None)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url)
        if api == "anthropic":
            client: Any = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=20)
            ask = client.messages.create(model="m", messages=HELLO, max_tokens=5)
        else:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)
            ask = client.chat.completions.create(model="m", messages=HELLO, stream=api == "openai-stream")
        asked = asyncio.ensure_future(ask)
        await eventually(lambda: asyncio.sleep(0, up.options.requests), "the upstream called")
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises((openai.APIStatusError, anthropic.APIStatusError)) as got:
            await asyncio.wait_for(asked, 10)
        assert_drain_cut(got.value, api)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        with sqlite3.connect(tmp_path / "edgeroute-ledger.db") as db:
            assert db.execute("SELECT outcome FROM spend").fetchall() == [("drain_cut",)]
            # The attempt was sent: its prompt is billed (estimated), as for a client gone.
            ((outcome, prompt, cost),) = db.execute("SELECT outcome, prompt_tokens, cost_usd FROM spend_attempts")
            assert (outcome, prompt > 0, cost > 0) == ("cancelled", True, True)
    finally:
        await killed(proc)


def assert_drain_cut(e: Any, api: str) -> None:
    """The 503 of a request the drain cut, in the API's format, as the SDK raised it."""
    assert e.status_code == 503
    assert e.response.headers["retry-after"] == "1"
    assert e.response.headers["content-type"].startswith("application/json")
    if api == "anthropic":
        assert e.body["type"] == "error" and e.body["error"]["type"] == "overloaded_error", e.body
    else:
        assert e.body["code"] == "server_shutdown", e.body  # the SDK's body is the `error` object
    assert "shutting down" in e.message
