"""`/v1/chat/completions` relayed from an OpenAI-format deployment: an event the OpenAI SDK
cannot read ends the client's stream with an API error, or fails over before any content.

The events were relayed unchanged once content had flowed: an upstream's `data: [1]`, a
choice that is a string, a null `delta`, bytes that are not UTF-8, a raw control character
or text that is not JSON crashed the client's stream inside the SDK or the code that reads it
(AttributeError, UnicodeDecodeError, JSONDecodeError: no `openai.APIError` its code handles),
and the request was recorded as served (`ok`, 200), the upstream never blamed. The
`/v1/messages` and `/v1/responses` pass-throughs had the same fix; this is chat's. A JSON
answer of the same shapes (a choice that is a string or null, a null message) was a 200 too:
it is the upstream's failure now (fails over; a 502 when no deployment is left).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import eventually
from tests.security.conftest import ScriptedStreams, Served, chat_upstream, failover_config

USER: Any = [{"role": "user", "content": "hi"}]


def _chunk(choice: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


HEAD = _chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
DELTA = _chunk({"index": 0, "delta": {"content": "partial"}, "finish_reason": None})
END = _chunk({"index": 0, "delta": {}, "finish_reason": "stop"}) + b"data: [DONE]\n\n"
_OPEN = b'data: {"id":"c1","object":"chat.completion.chunk","created":0,"model":"x","choices":'
BAD = {
    "not-an-object": b"data: [1]\n\n",
    "string-choice": _OPEN + b'["x"]}\n\n',
    "null-delta": _OPEN + b'[{"index":0,"delta":null,"finish_reason":null}]}\n\n',
    "choices-an-object": _OPEN + b'{"index":0}}\n\n',
    "not-utf8": _OPEN + b'[{"index":0,"delta":{"content":"\xff\xfe"},"finish_reason":null}]}\n\n',
    "raw-nul": _OPEN + b'[{"index":0,"delta":{"content":"a\x00b"},"finish_reason":null}]}\n\n',
    "not-json": b"data: {oops\n\n",
}


@pytest.fixture
async def upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/chat/completions")
    yield made
    await made.close()


async def _stream(proxy: Served, upstreams: ScriptedStreams) -> tuple[str, str]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    text: list[str] = []
    error = ""
    try:
        async for c in await client.chat.completions.create(model="m", messages=USER, stream=True):
            for choice in c.choices:  # what an application's code reads
                text.append(choice.delta.content or "")
                if choice.delta.content:
                    upstreams.go.set()
    except openai.APIError as e:  # anything else (a crash in the SDK or in this code) fails the test
        error = str(e)
    finally:
        await client.close()
    return "".join(text), error


@pytest.mark.parametrize("bad", list(BAD))
async def test_after_content_the_stream_ends_with_an_api_error(
    upstreams: ScriptedStreams, serve: Any, bad: str
) -> None:
    up = await upstreams(HEAD + DELTA, BAD[bad] + DELTA + END)
    proxy: Served = await serve(failover_config(up))
    text, error = await _stream(proxy, upstreams)
    assert text == "partial"
    assert "The upstream sent a stream event" in error and "the answer is incomplete" in error, error

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_protocol_error")
    assert rec.usage is not None and rec.usage.completion_tokens >= 1  # what was sent is priced


@pytest.mark.parametrize("bad", list(BAD))
async def test_before_content_it_fails_over(upstreams: ScriptedStreams, serve: Any, bad: str) -> None:
    broken = await upstreams(HEAD + BAD[bad] + DELTA + END)
    good = await upstreams(HEAD + DELTA + END)
    proxy: Served = await serve(failover_config(broken, good))
    assert await _stream(proxy, upstreams) == ("partial", "")
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d0", "d1"]
    assert "sent a stream event" in (rec.attempts[0].error or ""), rec.attempts[0]


ODD_ANSWERS: dict[str, Any] = {
    "choices-a-string": "x",
    "choices-an-object": {"0": {"message": {"role": "assistant", "content": "hi"}}},
    "null-choice": [None],
    "string-choice": ["x"],
    "null-message": [{"index": 0, "message": None, "finish_reason": "stop"}],
    "string-message": [{"index": 0, "message": "hi", "finish_reason": "stop"}],
}


def _answering(choices: Any) -> Any:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        body = {"id": "c1", "object": "chat.completion", "created": 0, "model": "x", "choices": choices, "usage": usage}
        return web.json_response(body)

    return chat


@pytest.mark.parametrize("odd", list(ODD_ANSWERS))
async def test_a_json_answer_the_sdk_cannot_read_fails_over_or_is_a_502(serve: Any, odd: str) -> None:
    """The same shapes in a JSON answer went to the client as a 200 (`answer.choices[0].message.content`
    raised AttributeError or KeyError in its code), recorded as served, never failed over."""
    broken = await chat_upstream(_answering(ODD_ANSWERS[odd]))
    good = await chat_upstream(_answering([{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                            "finish_reason": "stop"}]))  # fmt: skip
    try:
        proxy: Served = await serve(failover_config(broken, good))
        alone: Served = await serve(failover_config(broken))
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
            answer = await client.chat.completions.create(model="m", messages=USER)
        assert answer.choices[0].message.content == "hi"
        rec = proxy.recorder.records[-1]
        assert [a.deployment for a in rec.attempts] == ["d0", "d1"]
        assert "choices that are not objects with a message object" in (rec.attempts[0].error or ""), rec.attempts
        async with openai.AsyncOpenAI(base_url=alone.url + "/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="m", messages=USER)
        assert raised.value.status_code == 502
    finally:
        await broken.close()
        await good.close()
