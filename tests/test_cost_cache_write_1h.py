"""Anthropic's 1-hour prompt-cache writes are priced as Anthropic bills them: 2x the input price.

Anthropic reports how a prompt's cache writes split between its 5-minute cache (billed 1.25x
input, the catalogue's `cache_write`) and its 1-hour cache (2x input) in
`usage.cache_creation.{ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`. edgeroute read
only the total and priced every write at the 5-minute price: 400 tokens written for an hour were
charged 37.5 % below their bill, and a reservation (at the dearest prompt price, 1.25x) did not
cover a prompt written to the 1-hour cache. Here a scripted Anthropic upstream reports the
split; the clients are the official SDKs, on edgeroute's OpenAI API and its Anthropic one,
answers and streams alike.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.accounting import Usage, cost_of
from edgeroute.config import Price
from edgeroute.config.prices import catalogue_entry
from edgeroute.cost.prices import ceiling
from tests.conftest import ServeRoutes, eventually

# $/Mtok, as red team B's repro had them: input 1000, 5-minute writes 1250, reads 100, output 1000.
PRICE = {
    "input_per_mtok": 1000.0,
    "cache_write_per_mtok": 1250.0,
    "cached_input_per_mtok": 100.0,
    "output_per_mtok": 1000.0,
}
USAGE = {
    "input_tokens": 10,
    "output_tokens": 10,
    "cache_read_input_tokens": 0,
    "cache_creation_input_tokens": 1000,
    "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
}
# 10 fresh + 10 out at $0.001, 600 at $0.00125, 400 at 2x input ($0.002): Anthropic's bill.
BILL = 0.02 + 600 * 1.25e-3 + 400 * 2e-3


async def _messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": None}
    if not body.get("stream"):
        content = [{"type": "text", "text": "hi there"}]
        return web.json_response({**msg, "content": content, "stop_reason": "end_turn", "usage": USAGE})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    start_usage = {**USAGE, "output_tokens": 1}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**msg, "content": [], "usage": start_usage}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 10}},
        {"type": "message_stop"},
    ]
    for ev in events:
        await resp.write(b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
    return resp


def _config(url: str) -> dict[str, Any]:
    return {
        "providers": {"a": {"kind": "anthropic", "base_url": url + "/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "a", "model": "claude-sonnet-4-5", "price": PRICE}},
        "models": {"m": {"deployments": ["d"]}},
    }


def _charged(proxy: Any) -> Any:
    """The proxy's last record, charged Anthropic's bill."""
    rec = proxy.recorder.records[-1]
    assert rec.cost_usd == pytest.approx(BILL)
    return rec


def test_one_hour_writes_cost_their_own_price_and_default_to_twice_the_input() -> None:
    u = Usage(prompt_tokens=1010, completion_tokens=10, cache_write_tokens=1000, cache_write_1h_tokens=400)
    assert cost_of(Price(**PRICE), u) == pytest.approx(BILL)
    own = Price(**PRICE, cache_write_1h_per_mtok=1500.0)
    assert cost_of(own, u) == pytest.approx(0.02 + 600 * 1.25e-3 + 400 * 1.5e-3)
    # A price without a cache-write price prices every write as input, 1-hour ones too.
    plain = Price(input_per_mtok=1000.0, output_per_mtok=1000.0)
    assert cost_of(plain, u) == pytest.approx(1020 * 1e-3)


def test_a_reservation_covers_a_prompt_written_to_the_one_hour_cache() -> None:
    entry = catalogue_entry("claude-sonnet-4-5")
    top = ceiling([Price(**entry)])
    assert top.input_per_mtok == pytest.approx(2 * entry["input_per_mtok"])
    assert ceiling([Price(input_per_mtok=1.0, output_per_mtok=2.0)]).input_per_mtok == 1.0  # no cache writes


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_clients_are_charged_the_one_hour_price(
    serve_routes: ServeRoutes, start_proxy: Any, stream: bool
) -> None:
    proxy = await start_proxy(_config((await serve_routes(web.post("/v1/messages", _messages))).url))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        args: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        if stream:
            async with client.chat.completions.with_streaming_response.create(
                **args, stream=True, stream_options={"include_usage": True}
            ) as raw:
                async for _ in raw.iter_lines():
                    pass
        else:
            raw = await client.chat.completions.with_raw_response.create(**args)
            assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(BILL)
    rec = _charged(proxy)
    assert rec.usage is not None and (rec.usage.cache_write_tokens, rec.usage.cache_write_1h_tokens) == (1000, 400)


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_clients_are_charged_the_one_hour_price(
    serve_routes: ServeRoutes, start_proxy: Any, stream: bool
) -> None:
    proxy = await start_proxy(_config((await serve_routes(web.post("/v1/messages", _messages))).url))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        args: dict[str, Any] = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            async with client.messages.stream(**args) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(**args)
    assert msg.usage.cache_creation_input_tokens == 1000
    _charged(proxy)


async def _cut_after_content(request: web.Request) -> web.StreamResponse:
    """A stream cut after its first content: only message_start carried the usage."""
    body = await request.json()
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "stop_reason": None}
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for ev in (
        {"type": "message_start", "message": {**msg, "content": [], "usage": {**USAGE, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
    ):
        await resp.write(b"event: " + ev["type"].encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
    assert request.transport is not None
    request.transport.close()
    return resp


async def test_a_cut_stream_keeps_its_one_hour_writes(serve_routes: ServeRoutes, start_proxy: Any) -> None:
    """Counted from its text, a stream cut before its last usage keeps the prompt's counts that
    message_start reported, its 1-hour writes among them (they were priced as 5-minute ones)."""
    proxy = await start_proxy(_config((await serve_routes(web.post("/v1/messages", _cut_after_content))).url))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=20, stream=True
        )
        with pytest.raises(openai.APIError):
            _ = [c async for c in stream]

    async def settled() -> Any:
        recs = proxy.recorder.records
        return recs[-1] if recs and recs[-1].attempts and recs[-1].attempts[0].usage else None

    rec = await eventually(settled, "the cut stream's record")
    usage = rec.attempts[0].usage
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1000, 400)
