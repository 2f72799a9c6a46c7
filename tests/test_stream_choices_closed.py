"""A careless OpenAI-compatible upstream's stream that goes on after a choice's `finish_reason`
(a second answer), or sends a choice the request's `n` did not ask for: that is none of the
answer. It is not relayed (the client saw two finishes), not cached (a hit replayed
"firstsecond"), and not part of an Anthropic client's message (two text blocks, "zeroFIVE")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.test_stream_hold_usage_and_format import _streaming


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[],'
USAGE += b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
TWO_ANSWERS = [
    _chunk({"role": "assistant", "content": "first"}),
    _chunk({}, "stop"),
    _chunk({"role": "assistant", "content": "second"}),
    _chunk({}, "stop"),
    USAGE,
    b"data: [DONE]\n\n",
]
UNASKED_CHOICE = [
    _chunk({"role": "assistant", "content": "zero"}),
    _chunk({"role": "assistant", "content": "FIVE"}, index=5),
    _chunk({}, "stop"),
    _chunk({}, "stop", index=5),
    USAGE,
    b"data: [DONE]\n\n",
]


async def _proxy(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]],
    serve_routes: ServeRoutes,
    events: list[bytes],
    **extra: Any,
) -> tuple[Proxy, list[int]]:
    calls: list[int] = []

    stream = _streaming(events)

    async def handle(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        return await stream(request)

    up = await serve_routes(web.post("/v1/chat/completions", handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"], "cache": {"ttl": 300}}},
            **extra,
        }
    )
    return proxy, calls


@pytest.mark.parametrize("events", [TWO_ANSWERS, UNASKED_CHOICE], ids=["after-finish", "index-past-n"])
async def test_an_openai_client_gets_and_the_cache_keeps_the_answer_alone(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, events: list[bytes]
) -> None:
    proxy, calls = await _proxy(start_proxy, serve_routes, events)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    want = "first" if events is TWO_ANSWERS else "zero"
    try:
        for label in ("miss", "hit"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True
            )
            chunks = [c async for c in raw.parse()]
            assert raw.headers["x-edgeroute-cache"] == label
            assert {ch.index for c in chunks for ch in c.choices} == {0}
            assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == want
            assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
    finally:
        await client.close()
    assert len(calls) == 1


@pytest.mark.parametrize("events", [TWO_ANSWERS, UNASKED_CHOICE], ids=["after-finish", "index-past-n"])
async def test_an_anthropic_client_gets_one_text_block(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, events: list[bytes]
) -> None:
    proxy, _ = await _proxy(start_proxy, serve_routes, events)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    try:
        async with client.messages.stream(
            model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            message = await stream.get_final_message()
    finally:
        await client.close()
    want = "first" if events is TWO_ANSWERS else "zero"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", want)]
    assert message.stop_reason == "end_turn"


def test_the_anthropic_encoder_reads_one_choice_to_its_finish() -> None:
    """The encoder alone (a stream that reaches it without the relay's check, `/v1/messages`
    served natively by an OpenAI-format deployment)."""
    from edgeroute.anthropic_api import StreamEncoder

    out = StreamEncoder()(b"".join(UNASKED_CHOICE[:3]) + b"".join(TWO_ANSWERS[2:]))
    texts = [
        e["delta"]["text"]
        for line in out.split(b"\n")
        if line.startswith(b"data: ") and (e := orjson.loads(line[6:]))["type"] == "content_block_delta"
    ]
    assert texts == ["zero"]


async def test_annotations_after_a_finish_and_a_servers_own_events_go_on(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    """What is not more of the answer is relayed as before: Azure's content-filter results in a
    chunk after the finish (dropped with the check above, and lost to clients), and a server's
    own event with a `type` (`{"type": "ping"}`: taken for another API's event, the stream
    failed over, then was a 502)."""
    filtered = {"hate": {"filtered": False, "severity": "safe"}}
    annotations = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "delta": {}, "finish_reason": None, "content_filter_results": filtered}],
    }
    events = [
        b'data: {"type":"ping"}\n\n',
        _chunk({"role": "assistant", "content": "answer"}),
        _chunk({}, "stop"),
        b"data: " + orjson.dumps(annotations) + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    proxy, calls = await _proxy(start_proxy, serve_routes, events)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
    finally:
        await client.close()
    choices = [ch for c in chunks for ch in c.choices or ()]  # (the ping has none: relayed as it came)
    assert "".join(ch.delta.content or "" for ch in choices) == "answer"
    extra = [ch.model_extra for ch in choices if ch.model_extra]
    assert {"content_filter_results": filtered} in extra
    assert len(calls) == 1
