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
from aiohttp.test_utils import TestServer

from tests.conftest import eventually
from tests.providers_fixtures import provider_config, start_mock
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

WORDS = 300  # streamed before the cut: about 300 tokens ("word " is one token)
ADMIN, APP = "sk-combos2-admin", "sk-combos2-app"
OUT_PRICE = 10.0  # USD per million output tokens; input is free, so the cost is the answer's


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
    usage = {"input_tokens": 20, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
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
    app = web.Application()
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/messages", _messages)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


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
