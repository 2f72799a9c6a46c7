"""Tool calls through a translation, as the client's SDK assembles them.

An Anthropic client served by an OpenAI-format upstream gets each tool call whole at the
answer's finish: with its id and name though they came after its first delta (they were empty),
with the arguments sent around text (a delta went to a block already stopped, whose stop event
carried `input {}`), and never with arguments that are not JSON (`messages.stream` raised a
ValueError, the answer lost and recorded ok): that stream ends with an error event, as the answer
not streamed is a 502. `tool_calls` with no call is `end_turn`, not a `tool_use` stop without a
`tool_use` block. A call whose input an Anthropic-format upstream gives whole in its block's start
keeps it (it was `{}`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.test_stream_hold_usage_and_format import _streaming
from tests.test_translated_stream_ends import STOP, _ant, _record, _start

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"name": "get_w", "description": "weather", "input_schema": {"type": "object", "properties": {}}}]
USAGE = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[],'
USAGE += b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _call(args: str, **head: Any) -> bytes:
    fn = {"arguments": args, **({"name": head.pop("name")} if "name" in head else {})}
    return _chunk({"tool_calls": [{"index": 0, **head, "function": fn}]})


def _stream(*body: bytes, finish: str = "tool_calls") -> list[bytes]:
    return [_chunk({"role": "assistant", "content": ""}), *body, _chunk({}, finish), USAGE, b"data: [DONE]\n\n"]


NAMED_LATE = _stream(_call(""), _call('{"q":', id="call_9", type="function", name="get_w"), _call("2}"))
TEXT_BETWEEN_ARGS = _stream(
    _chunk({"content": "A"}),
    _call('{"x":', id="call_1", type="function", name="get_w"),
    _chunk({"content": "B"}),
    _call("1}"),
)
NOT_JSON = _stream(
    _chunk({"content": "Let me see."}), _call('{"city": Oslo}', id="call_1", type="function", name="get_w")
)
CALL_AS_TEXT = _stream(_chunk({"content": '<tool_call>{"name": "get_w"}</tool_call>'}))


async def _chat_proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes], **model: Any) -> Proxy:
    up = await serve_routes(web.post("/v1/chat/completions", _streaming(events)))
    return await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"], **model}},
        }
    )


async def _anthropic_stream(proxy: Proxy) -> tuple[Any, list[Any]]:
    """The final message and the events of `messages.stream`."""
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    try:
        async with client.messages.stream(model="m", max_tokens=50, messages=HI, tools=TOOLS) as stream:  # type: ignore[arg-type]
            events = [e async for e in stream]
            return await stream.get_final_message(), events
    finally:
        await client.close()


def _blocks(message: Any) -> list[tuple[Any, ...]]:
    return [(b.type, b.text) if b.type == "text" else (b.type, b.id, b.name, b.input) for b in message.content]


async def test_a_call_named_after_its_first_delta_keeps_its_id_and_name(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _chat_proxy(start_proxy, serve_routes, NAMED_LATE)
    message, _ = await _anthropic_stream(proxy)
    assert _blocks(message) == [("tool_use", "call_9", "get_w", {"q": 2})]
    assert message.stop_reason == "tool_use"


async def test_a_responses_client_gets_the_calls_late_id_and_name(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _chat_proxy(start_proxy, serve_routes, NAMED_LATE)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "name": "get_w", "parameters": {"type": "object", "properties": {}}}
    try:
        async with client.responses.stream(model="m", input="hi", tools=[tool]) as stream:  # type: ignore[list-item]
            final = await stream.get_final_response()
    finally:
        await client.close()
    calls = [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert calls == [("call_9", "get_w", '{"q":2}')]


async def test_text_between_a_calls_arguments_leaves_the_call_whole(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _chat_proxy(start_proxy, serve_routes, TEXT_BETWEEN_ARGS)
    message, events = await _anthropic_stream(proxy)
    assert _blocks(message) == [("text", "A"), ("tool_use", "call_1", "get_w", {"x": 1}), ("text", "B")]
    stopped: set[int] = set()
    for e in events:
        if e.type == "content_block_stop":
            stopped.add(e.index)
            if e.content_block.type == "tool_use":  # an agent loop runs the tool at its block's stop
                assert e.content_block.input == {"x": 1}
        elif e.type in ("content_block_delta", "input_json", "text"):
            assert getattr(e, "index", None) not in stopped, e


async def test_arguments_that_are_not_json_end_the_stream_with_an_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _chat_proxy(start_proxy, serve_routes, NOT_JSON, cache={"ttl": 300})
    for _ in range(2):  # and not cached: the second request reaches the upstream again
        with pytest.raises(anthropic.APIStatusError, match="invalid JSON arguments"):
            await _anthropic_stream(proxy)
        rec = await _record(proxy)
        assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_protocol_error")
        assert rec.cache != "hit"
    assert len(proxy.recorder.records) == 2


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_tool_calls_without_a_call_end_the_turn(
    start_proxy: StartProxy, serve_routes: ServeRoutes, stream: bool
) -> None:
    text = '<tool_call>{"name": "get_w"}</tool_call>'
    answer = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            resp: web.StreamResponse = await _streaming(CALL_AS_TEXT)(request)
            return resp
        return web.json_response(answer)

    up = await serve_routes(web.post("/v1/chat/completions", handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    if stream:
        message, _ = await _anthropic_stream(proxy)
    else:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        try:
            message = await client.messages.create(model="m", max_tokens=50, messages=HI, tools=TOOLS)  # type: ignore[arg-type]
        finally:
            await client.close()
    assert (_blocks(message), message.stop_reason) == ([("text", text)], "end_turn")


TOOL_INPUT_IN_START = [
    _start("msg_A", 10),
    _ant(
        "content_block_start",
        index=0,
        content_block={"type": "tool_use", "id": "toolu_1", "name": "get_w", "input": {"city": "Oslo"}},
    ),
    _ant("content_block_stop", index=0),
    _ant("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 5}),
    STOP,
]


async def test_a_calls_input_given_in_its_blocks_start_is_kept(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    up = await serve_routes(web.post("/v1/messages", _streaming(TOOL_INPUT_IN_START)))
    proxy = await start_proxy(
        {
            "providers": {"a": {"kind": "anthropic", "base_url": up.url, "api_key": "k"}},
            "deployments": {"d": {"provider": "a", "model": "claude-x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    tool = {"type": "function", "function": {"name": "get_w", "parameters": {"type": "object", "properties": {}}}}
    try:
        async with oai.chat.completions.stream(model="m", messages=HI, tools=[tool]) as s:  # type: ignore[arg-type,list-item]
            final = await s.get_final_completion()
    finally:
        await oai.close()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("toolu_1", "get_w", {"city": "Oslo"})
    ]
    message, _ = await _anthropic_stream(proxy)  # translated both ways: Anthropic → OpenAI → Anthropic
    assert _blocks(message) == [("tool_use", "toolu_1", "get_w", {"city": "Oslo"})]


TOOL_USE_STOP_WITHOUT_CALL = [
    _start("msg_A", 10),
    _ant("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    _ant("content_block_delta", index=0, delta={"type": "text_delta", "text": "abc"}),
    _ant("content_block_stop", index=0),
    _ant("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 5}),
    STOP,
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_a_tool_use_stop_without_a_call_is_stop_for_an_openai_client(
    start_proxy: StartProxy, serve_routes: ServeRoutes, stream: bool
) -> None:
    """The other way (an Anthropic-format gateway's `tool_use` stop with no `tool_use` block):
    `finish_reason: tool_calls` with no `tool_calls` sent a loop over them into a TypeError."""
    answer = {
        "id": "msg_A",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "abc"}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }

    async def handle(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            resp: web.StreamResponse = await _streaming(TOOL_USE_STOP_WITHOUT_CALL)(request)
            return resp
        return web.json_response(answer)

    up = await serve_routes(web.post("/v1/messages", handle))
    proxy = await start_proxy(
        {
            "providers": {"a": {"kind": "anthropic", "base_url": up.url, "api_key": "k"}},
            "deployments": {"d": {"provider": "a", "model": "claude-x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    final: Any
    try:
        if stream:
            async with oai.chat.completions.stream(model="m", messages=HI) as s:  # type: ignore[arg-type]
                final = await s.get_final_completion()
        else:
            final = await oai.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
    finally:
        await oai.close()
    choice = final.choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == ("abc", None, "stop")


@pytest.mark.parametrize("extra", [{}, {"top_k": 5}], ids=["translated", "passed-through"])
async def test_a_call_whose_arguments_take_longer_than_first_byte_is_not_failed_over(
    start_proxy: StartProxy, serve_routes: ServeRoutes, extra: dict[str, Any]
) -> None:
    """Held to the finish, a call's arguments streamed for longer than the first-byte timeout (a
    large file written by a coding agent's tool): its block's start, once named, shows the answer
    has begun (`top_k` serves the request on the pass-through path, its stream held on Anthropic
    events), where the relay held on and failed the attempt over."""
    calls: list[int] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": None}))
        await resp.write(_call("", id="call_1", type="function", name="get_w"))
        for piece in ('{"path": "a.py", ', '"text": "', "x" * 10, '"}'):
            await asyncio.sleep(0.25)  # 1 s in all, past first_byte
            await resp.write(_call(piece))
        for event in (_chunk({}, "tool_calls"), USAGE, b"data: [DONE]\n\n"):
            await resp.write(event)
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", handle))
    timeouts = {"first_byte": 0.6, "idle": 5}
    provider = {"kind": "openai_compatible", "base_url": up.url + "/v1", "timeouts": timeouts}
    proxy = await start_proxy(
        {
            "providers": {"p": {**provider, "options": {"unsupported_params": "drop"}}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    try:
        ask: Any = {"model": "m", "max_tokens": 50, "messages": HI, "tools": TOOLS, "extra_body": extra}
        async with client.messages.stream(**ask) as stream:
            message = await stream.get_final_message()
    finally:
        await client.close()
    assert _blocks(message) == [("tool_use", "call_1", "get_w", {"path": "a.py", "text": "x" * 10})]
    assert len(calls) == 1


async def test_a_client_hears_pings_while_a_calls_arguments_are_held(
    start_proxy: StartProxy, serve_routes: ServeRoutes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's arguments are held to the finish: an agent writing a large file through a tool
    heard nothing for minutes, and a proxy's idle timeout (nginx: 60 s) cut the paid answer.
    Anthropic's own `ping` events go out meanwhile (every 5 s; 0.2 s here)."""
    monkeypatch.setattr("edgeroute.anthropic_api.PING_S", 0.2)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": None}))
        await resp.write(_call("", id="call_1", type="function", name="get_w"))
        for piece in ('{"path": "a.py", ', '"text": "', *(["x"] * 8), '"}'):
            await asyncio.sleep(0.1)
            await resp.write(_call(piece))
        for event in (_chunk({}, "tool_calls"), USAGE, b"data: [DONE]\n\n"):
            await resp.write(event)
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", handle))
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    message, _ = await _anthropic_stream(proxy)  # the SDK reads the answer whole, pings and all
    assert _blocks(message) == [("tool_use", "call_1", "get_w", {"path": "a.py", "text": "x" * 8})]
    ask = {"model": "m", "max_tokens": 50, "messages": HI, "tools": TOOLS, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/messages", json=ask) as r:
        wire = await r.read()
    assert wire.count(b"event: ping\n") >= 2
