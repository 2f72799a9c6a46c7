"""Streams passed through in their own format (`/v1/responses` to a Responses upstream,
`/v1/messages` with Anthropic-only fields to Anthropic) with the request's record and cost.

A stream that breaks after its first content is the request's answer: it ends with an error
event, and what the client received is priced. The relay counts a stream that carried no
final usage from its text; a native stream's text is in its own events (Responses deltas,
Anthropic content blocks), not in chat chunks, and Anthropic's `message_start` carries a
provisional usage (one output token) that is not the answer's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream
from tests.providers_fixtures import provider_config, start_mock
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

WORDS = 300  # streamed before the cut: about 300 tokens ("word " is one token)
ADMIN, APP = "sk-combos2-admin", "sk-combos2-app"
OUT_PRICE = 10.0  # USD per million output tokens; input is free, so the cost is the answer's
# A prompt mostly read from Anthropic's prompt cache, as its message_start reports it.
CACHE = {"cache_creation_input_tokens": 1000, "cache_read_input_tokens": 50_000}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def _cut(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"".join(events))
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()  # mid-stream: no terminal event, no final usage
    return out


async def _responses(request: web.Request) -> web.StreamResponse:
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_x", "status": "in_progress"}}
    deltas = [
        {
            "type": "response.output_text.delta",
            "sequence_number": i + 1,
            "item_id": "msg_x",
            "output_index": 0,
            "content_index": 0,
            "delta": "word ",
            "logprobs": [],
        }
        for i in range(WORDS)
    ]
    return await _cut(request, [_sse(created), *map(_sse, deltas)])


async def _messages(request: web.Request) -> web.StreamResponse:
    usage = {"input_tokens": 20, "output_tokens": 1, **CACHE}
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_x",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        },
    }
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word "}}
    return await _cut(request, [_sse(start), _sse(block), *[_sse(delta)] * WORDS])


@pytest.fixture
async def cutting() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/responses", _responses), web.post("/v1/messages", _messages)) as server:
        yield server.url


def _config(kind: str, base_url: str) -> dict[str, Any]:
    return {
        "providers": {"p": {"kind": kind, "base_url": base_url, "api_key": "key-p"}},
        "deployments": {
            "d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 0, "output_per_mtok": OUT_PRICE}}
        },
        "models": {"m": {"deployments": ["d"]}},
    }


async def _assert_priced_for_what_was_sent(proxy: Any) -> None:
    async def recorded() -> list[Any]:  # written once the count (in a worker thread) is in
        return list(proxy.recorder.records)

    (rec,) = await eventually(recorded, "the request's record")
    assert rec.outcome == "stream_interrupted", rec.outcome
    assert rec.usage is not None
    # The client received ~300 tokens: they are paid for (counted, within the tokenizer's slack).
    assert WORDS * 0.8 <= rec.usage.completion_tokens <= WORDS * 1.2, rec.usage
    assert rec.cost_usd == pytest.approx(rec.usage.completion_tokens * OUT_PRICE / 1e6)


async def test_a_responses_stream_cut_mid_way_is_priced_for_its_text(start_proxy: Any, cutting: str) -> None:
    proxy = await start_proxy(_config("openai", cutting + "/v1"))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    kinds: list[str] = []
    async for ev in await client.responses.create(model="m", input="hi", stream=True):
        kinds.append(ev.type)
    assert kinds.count("response.output_text.delta") == WORDS and kinds[-1] == "error"
    await _assert_priced_for_what_was_sent(proxy)


async def test_a_passed_through_messages_stream_cut_mid_way_is_priced_for_its_text(
    start_proxy: Any, cutting: str
) -> None:
    proxy = await start_proxy(_config("anthropic", cutting))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    text = ""
    with pytest.raises(anthropic.APIStatusError):  # the stream's `error` event
        # `top_k` only Anthropic understands: the request is passed through as sent.
        async with client.messages.stream(
            model="m", max_tokens=1000, extra_body={"top_k": 5}, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            async for t in s.text_stream:
                text += t
    assert text == "word " * WORDS
    await _assert_priced_for_what_was_sent(proxy)


async def test_the_request_log_keeps_a_native_streams_text(start_mock: Any, tmp_path: Path) -> None:
    """`log_content: full`: a stream relayed in its own format is stored as the text the client read."""
    oa = await start_mock("openai")
    an = await start_mock("anthropic")
    cfg = provider_config({"o": oa, "a": an})
    cfg["ledger"] = {"path": str(tmp_path / "log.db"), "flush_interval": 0.05}
    cfg["request_log"] = {"log_content": "full"}
    cfg["keys"] = {"ops": {"token": ADMIN, "role": "admin"}, "app": {"token": APP}}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        said = ""
        async for ev in await client.responses.create(model="m-o", input="tell me", stream=True):
            if ev.type == "response.output_text.delta":
                said += ev.delta
        claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0)
        async with claude.messages.stream(
            model="m-a", max_tokens=100, extra_body={"top_k": 5}, messages=[{"role": "user", "content": "say so"}]
        ) as st:
            wrote = "".join([t async for t in st.text_stream])
        assert said and wrote
        admin = {"Authorization": f"Bearer {ADMIN}"}

        async def both_logged() -> list[dict[str, Any]] | None:
            async with s.get(proxy.url + "/admin/requests", headers=admin) as r:
                rows = (await r.json())["data"]
            return rows if len(rows) == 2 else None

        rows = await eventually(both_logged, "both requests logged")
        stored = {}
        for row in rows:
            async with s.get(proxy.url + f"/admin/requests/{row['id']}", headers=admin) as r:
                one = await r.json()
            stored[one["model"]] = one["content"]["response"]
    assert stored == {"m-o": said, "m-a": wrote}


@pytest.mark.parametrize("api", ["messages", "chat"])
async def test_a_cut_anthropic_stream_prices_the_prompt_its_message_start_reported(
    start_proxy: Any, cutting: str, api: str
) -> None:
    """Anthropic's message_start counts the prompt (fresh, read from the cache, written to it)
    before any text. A stream cut before its message_delta was priced at the core's count of
    the prompt, all of it at the input price: a 50,000-token prompt read from the cache (a tenth
    of the price) cost ten times what the provider billed, and a cache write a fifth less."""
    price = {"input_per_mtok": 3.0, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75}
    cfg = _config("anthropic", cutting)
    cfg["deployments"]["d"]["price"] |= price
    proxy = await start_proxy(cfg)
    messages: Any = [{"role": "user", "content": "hi"}]
    if api == "messages":
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError):
            async with client.messages.stream(
                model="m", max_tokens=1000, extra_body={"top_k": 5}, messages=messages
            ) as s:
                async for _ in s.text_stream:
                    pass
    else:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as oa:
            with pytest.raises(openai.APIError):
                async for _ in await oa.chat.completions.create(model="m", messages=messages, stream=True):
                    pass

    async def recorded() -> list[Any]:
        return list(proxy.recorder.records)

    (rec,) = await eventually(recorded, "the request's record")
    u = rec.usage
    assert u is not None and u.estimated  # the answer's count is the relay's
    read, written = CACHE["cache_read_input_tokens"], CACHE["cache_creation_input_tokens"]
    assert (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens) == (20 + read + written, read, written)
    assert WORDS * 0.8 <= u.completion_tokens <= WORDS * 1.2, u
    expected = (20 * 3.0 + read * 0.3 + written * 3.75 + u.completion_tokens * OUT_PRICE) / 1e6
    assert rec.cost_usd == pytest.approx(expected)
