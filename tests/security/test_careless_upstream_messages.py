"""Careless upstream behind `POST /v1/messages`: an OpenAI-format deployment whose 200 answer or
stream has a shape no OpenAI server sends. The Anthropic SDK, as a client, must get an error in
Anthropic's format (or the whole answer), never edgeroute's 500 or a corrupted HTTP stream; the
spend is recorded once either way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import eventually
from tests.security.conftest import Served, chat_upstream

USER: Any = [{"role": "user", "content": "hi"}]


class Careless:
    """Answers every chat request with `body` (JSON) or, for a stream, the events `events`."""

    def __init__(self) -> None:
        self.body: Any = None
        self.events: list[bytes] = []
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.Response(body=orjson.dumps(self.body), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in self.events:
            await resp.write(ev)
        await resp.write_eof()
        return resp


@pytest.fixture
async def careless() -> AsyncIterator[Careless]:
    up = Careless()
    up.server = await chat_upstream(up.handle)
    yield up
    await up.server.close()


def config(up: Careless) -> dict[str, Any]:
    assert up.server is not None
    return {
        "providers": {
            "p": {"base_url": f"http://127.0.0.1:{up.server.port}/v1", "api_key": "sk-test-0123456789abcdef"}
        },
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        },
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
    }


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(delta: Any, **extra: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "x",
        "choices": [{"index": 0, "delta": delta}],
        **extra,
    }


def answer(**fields: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "hi"}
    return {
        "id": "c1",
        "object": "chat.completion",
        "model": "x",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        **fields,
    }


def client(proxy: Served) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)


async def settled(proxy: Served) -> None:
    """The request's record is written as its answer ends: wait for it (bounded)."""

    async def recorded() -> bool:
        return proxy.recorder.count >= 1

    await eventually(recorded, "the request's record")


@pytest.mark.parametrize("body", [{"choices": "x"}, {"choices": [None]}], ids=["choices-string", "choices-null"])
async def test_careless_upstream_messages_unreadable_choices_are_the_upstreams_failure(
    careless: Careless, serve: Any, body: Any
) -> None:
    """Choices no OpenAI client can read are the upstream's failure, as on chat (they fail over;
    alone, a 502 in Anthropic's format): they were read as an answer the translation refused."""
    careless.body = body
    proxy = await serve(config(careless))
    async with client(proxy) as c:
        with pytest.raises(anthropic.APIStatusError) as err:
            await c.messages.create(model="m", max_tokens=10, messages=USER)
    assert err.value.status_code == 502
    assert err.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "All deployments for model 'm' failed (tried: d)."},
    }
    await settled(proxy)
    (rec,) = proxy.recorder.records
    assert rec.attempts[0].outcome == "server_error"
    assert "choices that are not objects" in (rec.attempts[0].error or "")


@pytest.mark.parametrize(
    "body",
    [
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": ["a list"]}, "finish_reason": "stop"}]},
        {"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": "x"}, "finish_reason": "tool_calls"}]},
        answer(usage=[1]),
        answer(usage={"prompt_tokens": -5, "completion_tokens": 1e300}),
    ],
    ids=["content-list", "tool-calls-string", "usage-list", "usage-absurd"],
)
async def test_careless_upstream_messages_odd_answer_is_a_502_in_anthropic_format(
    careless: Careless, serve: Any, body: Any
) -> None:
    """An unreadable 200 was edgeroute's 500 ("Internal error"); it is the upstream's 502. An answer
    whose only fault is its usage is served (the usage read as the ledger reads it)."""
    careless.body = body
    proxy = await serve(config(careless))
    async with client(proxy) as c:
        if "usage" in body:
            msg = await c.messages.create(model="m", max_tokens=10, messages=USER)
            assert [b.text for b in msg.content if b.type == "text"] == ["hi"]
            # Garbage is not relayed: a list reads as none (zeros), absurd counts as edgeroute's count.
            counted = body["usage"] != [1]
            assert (msg.usage.input_tokens > 0, msg.usage.output_tokens) == (counted, 1 if counted else 0)
        else:
            with pytest.raises(anthropic.APIStatusError) as err:
                await c.messages.create(model="m", max_tokens=10, messages=USER)
            assert err.value.status_code == 502
            assert err.value.body == {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "The upstream's answer could not be read as a chat completion.",
                },
            }
    await settled(proxy)
    assert proxy.recorder.count == 1 and proxy.recorder.records[0].cost_usd > 0  # the upstream billed: once


async def test_careless_upstream_messages_unreadable_first_chunk_ends_in_an_error_event(
    careless: Careless, serve: Any
) -> None:
    """A stream's first content chunk with a tool call the encoder cannot read (an index that is
    not a number) used to raise where the relay writes its held head: aiohttp then wrote an
    `HTTP/1.1 500` into the started chunked answer (the client saw a corrupt HTTP stream)."""
    careless.events = [
        event(chunk({"tool_calls": [{"index": "q", "function": "x"}]})),
        event(chunk({"content": "more"})),
        b"data: [DONE]\n\n",
    ]
    proxy = await serve(config(careless))
    async with client(proxy) as c:
        with pytest.raises(anthropic.APIStatusError) as err:
            async with c.messages.stream(model="m", max_tokens=10, messages=USER) as s:
                async for _ in s:
                    pass
        assert "could not read" in str(err.value)
    await settled(proxy)
    assert proxy.recorder.count == 1
    # Recorded as the upstream's broken stream it is (it was `ok`: the relay saw a clean `[DONE]`).
    rec = proxy.recorder.records[0]
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_protocol_error")


async def test_careless_upstream_messages_unreadable_usage_chunk_still_ends_the_stream(
    careless: Careless, serve: Any
) -> None:
    """A last usage chunk with counts that are not numbers made the encoder raise at `[DONE]`
    after it had marked itself ended: the client's stream stopped with neither message_stop nor
    an error event. The answer is whole: it ends normally, usage read as unknown."""
    careless.events = [
        event(chunk({"role": "assistant", "content": "hi"})),
        event(chunk({}, usage={"prompt_tokens": "x", "completion_tokens": 1})),
        event(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        ),
        b"data: [DONE]\n\n",
    ]
    proxy = await serve(config(careless))
    async with client(proxy) as c:
        async with c.messages.stream(model="m", max_tokens=10, messages=USER) as s:
            msg = await s.get_final_message()
    assert [b.text for b in msg.content if b.type == "text"] == ["hi"] and msg.stop_reason == "end_turn"
    await settled(proxy)
    assert proxy.recorder.count == 1
