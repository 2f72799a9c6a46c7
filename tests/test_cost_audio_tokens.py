"""Audio is priced at its own prices. OpenAI's usage counts audio among the prompt's and the
completion's tokens (`prompt_tokens_details.audio_tokens`, `completion_tokens_details.audio_tokens`),
billed at many times the text price (gpt-4o-audio-preview: $40 and $80 a million against $2.50
and $10): all of it was priced as text. A deployment's `audio_input_per_mtok` and
`audio_output_per_mtok` (or its catalogue entry's `audio_input`/`audio_output`) price them,
in a JSON answer's `x-edgeroute-cost-usd`, in a stream's usage chunk, and in the ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.config import parse, price_catalogue
from tests.security.conftest import chat_upstream
from tests.test_cost_abandoned_attempts import _rows
from tests.test_cost_support import cost_proxy

TEXT = {"input_per_mtok": 2.5, "output_per_mtok": 10.0, "cached_input_per_mtok": 1.25}
AUDIO = {**TEXT, "audio_input_per_mtok": 40.0, "audio_output_per_mtok": 80.0}
# 1,000 prompt tokens (600 of them audio, 100 cached), 500 completion tokens (400 of them audio).
USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 600},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 400},
}
WITH_AUDIO = (300 * 2.5 + 100 * 1.25 + 600 * 40 + 100 * 10 + 400 * 80) / 1e6
AS_TEXT = (900 * 2.5 + 100 * 1.25 + 500 * 10) / 1e6
MESSAGE = {"role": "assistant", "content": None, "audio": {"id": "audio_1", "data": "UklGRg==",
           "expires_at": 1, "transcript": "Hello there."}}  # fmt: skip


async def _answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        choice = {"index": 0, "message": MESSAGE, "finish_reason": "stop"}
        answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-audio-preview",
                  "choices": [choice], "usage": USAGE}  # fmt: skip
        return web.json_response(answer)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-audio-preview"}
    delta = {"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hello there."}}
    for chunk in (
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": USAGE},  # the usage chunk (stream_options.include_usage)
    ):
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp


def _config(port: int, db: Path, price: Any) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{port}/v1"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-audio-preview", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
    }


@pytest.mark.parametrize(("price", "expected"), [(AUDIO, WITH_AUDIO), (TEXT, AS_TEXT)], ids=["audio-price", "text"])
async def test_audio_tokens_are_priced_at_the_audio_prices(
    tmp_path: Path, price: dict[str, Any], expected: float
) -> None:
    up = await chat_upstream(_answer)
    db = tmp_path / "l.db"
    messages: Any = [{"role": "user", "content": "Say hello"}]
    try:
        async with cost_proxy(_config(up.port, db, price)) as proxy:
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m",
                    messages=messages,
                    modalities=["text", "audio"],
                    audio={"voice": "alloy", "format": "wav"},
                )
                answer = raw.parse()
                stream = await client.chat.completions.create(
                    model="m", messages=messages, stream=True, stream_options={"include_usage": True}
                )
                usage = [c.usage async for c in stream if c.usage is not None]
    finally:
        await up.close()
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.audio_tokens == 400  # the client sees the usage as sent
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(expected, abs=1e-8)
    assert len(usage) == 1 and usage[0].prompt_tokens_details is not None
    assert usage[0].prompt_tokens_details.audio_tokens == 600
    costs = [c for (c,) in _rows(db, "SELECT cost_usd FROM spend ORDER BY stream")]
    assert costs == [pytest.approx(expected), pytest.approx(expected)]  # the JSON answer's, then the stream's


def test_audio_prices_come_from_the_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"provider": "openai", "input": 2.5, "output": 10.0, "audio_input": 40.0, "audio_output": 80.0,
             "as_of": "2026-12-01", "source": "a test's price list"}  # fmt: skip
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"format": 2, "models": {"gpt-4o-audio-preview": entry}}))
    monkeypatch.setenv("EDGEROUTE_PRICES", str(path))
    cfg = parse(_config(9, tmp_path / "l.db", "catalogue"), "t.yaml")
    price = cfg.deployments["d"].price
    assert (price.audio_input_per_mtok, price.audio_output_per_mtok) == (40.0, 80.0)


def test_check_notes_an_audio_model_without_audio_prices(tmp_path: Path) -> None:
    cfg = _config(9, tmp_path / "l.db", TEXT)
    cfg["deployments"]["dear"] = {"provider": "p", "model": "gpt-4o-audio-preview", "price": AUDIO}
    path = tmp_path / "edge.yaml"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    r = subprocess.run(
        [sys.executable, "-m", "edgeroute", "check", str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "note: d serves an audio model without audio prices" in r.stderr and "dear" not in r.stderr


def test_litellms_audio_prices_are_imported() -> None:
    model = {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2.5e-6,
             "output_cost_per_token": 1e-5, "input_cost_per_audio_token": 4e-5,
             "output_cost_per_audio_token": 8e-5}  # fmt: skip
    raw = {"gpt-4o-audio-preview": model}
    cat, _ = price_catalogue.from_litellm(raw, "LiteLLM", "2026-12-01")
    entry = cat["models"]["gpt-4o-audio-preview"]
    assert (entry["audio_input"], entry["audio_output"]) == (pytest.approx(40.0), pytest.approx(80.0))
