"""Image parts that budgets did not reserve for, by body shapes the media count did not read.

Budgets reserve each image part at an allowance (`edgeroute.cost.media`), so concurrent requests
of many images cannot overshoot a budget. Two shapes escaped it: an Anthropic request carrying
a field only Anthropic understands (`top_k`, `cache_control`, `anthropic-beta`), which is
passed through natively, was reserved for its text alone; and a Responses
`function_call_output` whose `output` is an array of content parts (a tool returning a
screenshot) had its images sent to the provider, which bills them, unreserved. Ten
concurrent requests of ten images each spent five times a budget that holds three.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import budget_spent, cost_proxy, statuses_of

ADMIN = "sk-media-escape-admin"
APP = "sk-media-escape-app"
LIMIT = 0.05  # USD; at $1 a million input tokens an image of 1,000 tokens costs $0.001
IMAGES = 10  # a request's: $0.01 billed, $0.016 reserved at the 1,600-token cap
URL = "https://images.example/cat.png"


def _images(value: Any) -> int:
    """Image parts anywhere in a request (Anthropic `image` blocks, Responses `input_image`)."""
    if isinstance(value, dict):
        own = value.get("type") in ("image", "input_image")
        return own + sum(_images(v) for v in value.values())
    if isinstance(value, list):
        return sum(_images(v) for v in value)
    return 0


async def _answer(request: web.Request) -> web.Response:
    """Bills 1,000 tokens an image, as a provider counts them (Anthropic Messages, or Responses)."""
    body = await request.json()
    prompt = 5 + 1000 * _images(body.get("messages", body.get("input")))
    await asyncio.sleep(0.3)  # the requests overlap
    if request.path.endswith("/messages"):
        out: dict[str, Any] = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "x",
            "content": [{"type": "text", "text": "a cat"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 2},
        }
    else:
        text = {"type": "output_text", "text": "a cat", "annotations": []}
        message = {"type": "message", "id": "m", "role": "assistant", "status": "completed", "content": [text]}
        out = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": "x",
            "status": "completed",
            "output": [message],
            "usage": {"input_tokens": prompt, "output_tokens": 2, "total_tokens": prompt + 2},
        }
    return web.Response(body=orjson.dumps(out), content_type="application/json")


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/messages", _answer), web.post("/v1/responses", _answer)) as server:
        yield server.url


def _config(upstream: str, tmp_path: Path, kind: str) -> dict[str, Any]:
    base = upstream if kind == "anthropic" else upstream + "/v1"
    return {
        "providers": {"p": {"kind": kind, "base_url": base, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 0}}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }


async def _messages_native(url: str) -> None:
    """`top_k` is Anthropic's alone: the request is passed through to the Anthropic deployment."""
    image = {"type": "image", "source": {"type": "url", "url": URL}}
    async with anthropic.AsyncAnthropic(base_url=url, api_key=APP, max_retries=0) as client:
        await client.messages.create(
            model="m",
            max_tokens=5,
            extra_body={"top_k": 5},
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, *[image] * IMAGES]}],  # type: ignore[list-item]
        )


async def _tool_output_images(url: str) -> None:
    """A tool's screenshots returned in a `function_call_output`'s content parts."""
    image = {"type": "input_image", "image_url": URL, "detail": "high"}
    call = {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}]}
    output["output"] += [image] * IMAGES  # type: ignore[operator]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=APP, max_retries=0) as client:
        await client.responses.create(
            model="m",
            max_output_tokens=5,
            input=[{"role": "user", "content": "take screenshots"}, call, output],  # type: ignore[list-item]
        )


@pytest.mark.parametrize(
    ("ask", "kind"),
    [(_messages_native, "anthropic"), (_tool_output_images, "openai")],
    ids=["anthropic-passthrough", "responses-tool-output"],
)
async def test_concurrent_image_requests_do_not_overshoot_a_budget(
    ask: Callable[[str], Awaitable[None]], kind: str, upstream: str, tmp_path: Path
) -> None:
    async with cost_proxy(_config(upstream, tmp_path, kind)) as proxy:
        statuses = await statuses_of(lambda: ask(proxy.url))
        spent = await budget_spent(proxy.url, ADMIN)
    # Each reserves $0.016 for its images of $0.05: three fit, two where the text the request is
    # counted by (a Responses input served natively: its JSON) tips it past a third; the rest are
    # refused, not billed past the limit.
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert statuses.count(200) in (2, 3) and statuses.count(429) == 10 - statuses.count(200), statuses
