"""Spend escape: a Bedrock- or Gemini-format upstream whose usage has no output count, or a
count that is not a number.

A gateway in front of Bedrock or Gemini (or a careless one speaking their formats) may report
the input alone. Read as zero output tokens, its answers were priced as their prompt, however
long; a count sent as a string failed a good answer with a 502. Either way the answer is now
counted from its text (the Anthropic and OpenAI formats were fixed before:
`test_careless_upstream_anthropic_usage`, `test_careless_upstream_partial_usage`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.bedrock import event_frame
from tests.conftest import routes_upstream

ANSWER = " ".join(["word"] * 400)  # about 400 tokens of output
OUT = 10.0
# What the upstream reports, by the upstream model's name (a client's headers do not reach it).
USAGES = ("input-only", "string")
BEDROCK_USAGE = {"input-only": {"inputTokens": 12}, "string": {"inputTokens": 12, "outputTokens": "many"}}
GEMINI_USAGE = {"input-only": {"promptTokenCount": 12}, "string": {"promptTokenCount": 12, "candidatesTokenCount": "x"}}


def _usage_of(name: str, usages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return next(u for key, u in usages.items() if key in name)


async def _bedrock(request: web.Request) -> web.StreamResponse:
    usage = _usage_of(request.match_info["model"], BEDROCK_USAGE)
    if request.match_info["action"] == "converse":
        return web.json_response(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": ANSWER}]}},
                "stopReason": "end_turn",
                "usage": usage,
            }
        )
    out = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
    await out.prepare(request)
    await out.write(event_frame("messageStart", {"role": "assistant"}))
    await out.write(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": ANSWER}}))
    await out.write(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
    await out.write(event_frame("messageStop", {"stopReason": "end_turn"}))
    await out.write(event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 3}}))
    await out.write_eof()
    return out


async def _gemini(request: web.Request) -> web.StreamResponse:
    usage = _usage_of(request.match_info["tail"], GEMINI_USAGE)
    answer = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": ANSWER}]}, "finishReason": "STOP"}],
        "usageMetadata": usage,
    }
    if request.match_info["tail"].endswith(":generateContent"):
        return web.json_response(answer)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"data: " + orjson.dumps(answer) + b"\r\n\r\n")
    await out.write_eof()
    return out


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(
        web.post("/model/{model}/{action}", _bedrock), web.post("/v1beta/models/{tail}", _gemini)
    ) as server:
        yield server.url


def _config(root: str) -> dict[str, Any]:
    price = {"input_per_mtok": 0, "output_per_mtok": OUT}
    bedrock = {"region": "us-east-1", "aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "dummy-secret"}
    return {
        "providers": {
            "b": {"kind": "bedrock", "base_url": root, "options": bedrock},
            "g": {"kind": "gemini", "base_url": root + "/v1beta", "api_key": "AIza-test"},
        },
        "deployments": {
            **{f"b-{u}": {"provider": "b", "model": f"anthropic.claude-{u}", "price": price} for u in USAGES},
            **{f"g-{u}": {"provider": "g", "model": f"gemini-{u}", "price": price} for u in USAGES},
        },
        "models": {
            f"{kind}-{u}": {"deployments": [f"{kind[0]}-{u}"]} for kind in ("bedrock", "gemini") for u in USAGES
        },
    }


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("usage", USAGES)
@pytest.mark.parametrize("model", ["bedrock", "gemini"])
async def test_an_answer_without_a_readable_output_count_is_counted(
    start_proxy: Any, upstream: str, model: str, usage: str, stream: bool
) -> None:
    proxy = await start_proxy(_config(upstream))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    if stream:
        parts = await client.chat.completions.create(model=f"{model}-{usage}", messages=hi, stream=True)  # type: ignore[arg-type]
        text = "".join([c.choices[0].delta.content or "" async for c in parts if c.choices])
    else:
        got = await client.chat.completions.create(model=f"{model}-{usage}", messages=hi)  # type: ignore[arg-type]
        text = got.choices[0].message.content or ""
    await client.close()
    assert text == ANSWER
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and 350 <= rec.usage.completion_tokens <= 500, rec.usage
    assert rec.cost_usd == pytest.approx(rec.usage.completion_tokens * OUT / 1e6)
