"""Budgets reserve for a request's image parts, so concurrent requests of many images each
cannot overshoot a budget.

Admission reserved the text's tokens only: ten concurrent requests of ten images each, against
an upstream that bills 1,000 tokens an image, were all admitted against a budget that holds
three of them, and spent three times its limit (the actual cost was recorded afterwards). Each
image is now reserved at an allowance (1,600 tokens for a URL, whose size edgeroute cannot
know), or at a deployment's `media_tokens.image`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import cost_proxy

ADMIN = "sk-media-admin"
APP = "sk-media-app"
IN = 1.0  # USD per million input tokens: an image of 1,000 tokens costs $0.001
LIMIT = 0.05
IMAGES = 10  # a request's images: $0.01 billed, $0.016 reserved at the 1,600-token cap
URL = "https://images.example/cat.png"


def _images(items: list[dict[str, Any]]) -> int:
    """Image parts of chat `messages` or of Responses `input` items."""
    return sum(
        1
        for m in items
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") in ("image_url", "input_image")
    )


def _upstream(per_image: int) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(request: web.Request) -> web.Response:
        """Bills `per_image` tokens an image it is sent, as a provider counts them (chat
        completions, or Responses, which an OpenAI deployment is sent natively)."""
        body = await request.json()
        native = "input" in body
        prompt = 5 + per_image * _images(body["input"] if native else body["messages"])
        await asyncio.sleep(0.3)  # the requests overlap
        if native:
            text = {"type": "output_text", "text": "a cat", "annotations": []}
            message = {"type": "message", "id": "m", "role": "assistant", "status": "completed", "content": [text]}
            usage = {"input_tokens": prompt, "output_tokens": 2, "total_tokens": prompt + 2}
            response = {"id": "r", "object": "response", "created_at": 1, "model": "x", "status": "completed"}
            return web.json_response({**response, "output": [message], "usage": usage})
        out = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a cat"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": 2, "total_tokens": prompt + 2},
        }
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    return answer


@pytest.fixture
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    answer = _upstream(getattr(request, "param", 1000))
    async with routes_upstream(web.post("/v1/chat/completions", answer), web.post("/v1/responses", answer)) as server:
        yield server.url + "/v1"


def _config(upstream: str, tmp_path: Path, **deployment: Any) -> dict[str, Any]:
    price = {"input_per_mtok": IN, "output_per_mtok": 0}
    return {
        "providers": {"p": {"base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": {"provider": "p", "model": "x", "price": price, **deployment}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }


async def _spent(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            spent: float = next(b for b in (await r.json())["budgets"] if b["name"] == "b")["spent_usd"]
    return spent


async def _chat(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=APP, max_retries=0)
    image = {"type": "image_url", "image_url": {"url": URL, "detail": "high"}}
    async with client:
        await client.chat.completions.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}] + [image] * IMAGES}],
        )


async def _responses(url: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=APP, max_retries=0)
    image = {"type": "input_image", "image_url": URL, "detail": "auto"}
    content = [{"type": "input_text", "text": "what?"}, *[image] * IMAGES]
    async with client:
        await client.responses.create(
            model="m",
            max_output_tokens=5,
            input=[{"role": "user", "content": content}],  # type: ignore[list-item]
        )


async def _messages(url: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=url, api_key=APP, max_retries=0)
    image = {"type": "image", "source": {"type": "url", "url": URL}}
    async with client:
        await client.messages.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, *[image] * IMAGES]}],  # type: ignore[list-item]
        )


async def _escaped(url: str) -> int:
    """Chat with the part's type escaped (`image\\u005furl`): JSON for `image_url`, which the
    upstream reads, so a check of the body's bytes for the key would be evaded."""
    part = b'{"type":"image\\u005furl","image_url":{"url":"' + URL.encode() + b'"}}'
    body = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[' + b",".join([part] * IMAGES) + b"]}]}"
    headers = {"Authorization": f"Bearer {APP}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
        return r.status


async def _race(ask: Callable[[str], Awaitable[int | None]], url: str, n: int = 10) -> list[int]:
    async def one() -> int:
        try:
            status = await ask(url)
        except (openai.APIStatusError, anthropic.APIStatusError) as e:
            return e.status_code
        return 200 if status is None else status

    return list(await asyncio.gather(*(one() for _ in range(n))))


@pytest.mark.parametrize(
    "ask", [_chat, _responses, _messages, _escaped], ids=["chat", "responses", "messages", "chat-escaped"]
)
async def test_concurrent_image_requests_do_not_overshoot_a_budget(
    ask: Callable[[str], Awaitable[int | None]], upstream: str, tmp_path: Path
) -> None:
    async with cost_proxy(_config(upstream, tmp_path)) as proxy:
        statuses = await _race(ask, proxy.url)
        spent = await _spent(proxy.url)
    # Each reserves $0.016 of $0.05: three fit; the rest are refused, not billed past the limit.
    assert sorted(statuses) == [200] * 3 + [429] * 7, statuses
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget"


@pytest.mark.parametrize("upstream", [4000], indirect=True)
async def test_a_deployments_media_tokens_reserve_what_its_model_bills(upstream: str, tmp_path: Path) -> None:
    """A model billing 4,000 tokens an image (as gpt-4o-mini bills many times gpt-4o's count)
    is held to the budget by its deployment's `media_tokens.image`."""
    async with cost_proxy(_config(upstream, tmp_path, media_tokens={"image": 4000})) as proxy:
        statuses = await _race(_chat, proxy.url)
        spent = await _spent(proxy.url)
    assert sorted(statuses) == [200] + [429] * 9, statuses  # $0.04 reserved each
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget"


async def test_a_429_for_images_says_what_the_request_may_cost(upstream: str, tmp_path: Path) -> None:
    cfg = _config(upstream, tmp_path)
    cfg["budgets"]["limits"][0]["limit_usd"] = 0.01  # less than one request's images
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        image = {"type": "image_url", "image_url": {"url": URL}}
        with pytest.raises(openai.RateLimitError) as got:
            await client.chat.completions.create(
                model="m",
                max_tokens=5,
                messages=[{"role": "user", "content": [image] * IMAGES}],  # type: ignore[list-item]
            )
        await client.close()
    assert got.value.status_code == 429
    assert isinstance(got.value.body, dict) and got.value.body["code"] == "budget_exceeded"
    message = got.value.body["message"]
    assert "may cost: up to $0.02 for its prompt (with 16,000 tokens for its image" in message, message
