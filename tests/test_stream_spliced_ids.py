"""An OpenAI-format stream whose chunks switch to another completion's `id` mid-stream (a
careless upstream, or a load balancer that spliced two streams) is two answers, not one: relayed
as one, the OpenAI SDK's text was "Hello wholeOTHER ANSWER". After content the stream ends with an
error event after the first answer's text; before content the attempt fails over. Servers that
send an empty id, a usage chunk of the same id, or an id of its own on every chunk (LiteLLM,
llama.cpp, Foundry Local have) are relayed as before."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import sse
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_stream_hold_usage_and_format import _streaming

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]


def _chunk(cid: str, delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    obj = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(cid: str) -> bytes:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    obj = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [], "usage": usage}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
SPLICED_AFTER_CONTENT = [
    _chunk("c1", {"role": "assistant", "content": ""}),
    _chunk("c1", {"content": "Hello"}),
    _chunk("c1", {"content": " whole"}),
    _chunk("c2", {"content": "OTHER ANSWER"}),
    _chunk("c2", {}, "stop"),
    DONE,
]
SPLICED_BEFORE_CONTENT = [
    _chunk("c1", {"role": "assistant", "content": ""}),
    _chunk("c1", {"content": ""}),
    _chunk("c2", {"content": "OTHER ANSWER"}),
    _chunk("c2", {}, "stop"),
    DONE,
]
GOOD = [_chunk("g", {"role": "assistant", "content": "good"}), _chunk("g", {}, "stop"), _usage("g"), DONE]
# What must go on as before: Azure's prompt-filter chunk without an id, a usage chunk of the
# answer's id; a server that gives every chunk an id of its own.
AZURE_LIKE = [
    b'data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[]}\n\n',
    _chunk("a", {"role": "assistant", "content": "fine"}),
    _chunk("a", {"content": " answer"}),
    _chunk("", {}, "stop"),
    _usage("a"),
    DONE,
]
ID_PER_CHUNK = [
    _chunk("k1", {"role": "assistant", "content": "fine"}),
    _chunk("k2", {"content": " answer"}),
    _chunk("k3", {}, "stop"),
    _usage("k4"),
    DONE,
]


async def _proxy(
    start_proxy: StartProxy, serve_routes: ServeRoutes, *streams: list[bytes], path: str = "/v1/chat/completions"
) -> Proxy:
    """A model `m` whose first stream (at `path`) is `streams[0]`, the next ones its fallback models'."""
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {}}
    for i, events in enumerate(streams):
        up = await serve_routes(web.post(path, _streaming(events)))
        cfg["providers"][f"p{i}"] = {"base_url": up.url + "/v1"}
        cfg["deployments"][f"d{i}"] = {"provider": f"p{i}", "model": "x"}
        cfg["models"]["m" if i == 0 else f"m{i}"] = {"deployments": [f"d{i}"]}
    cfg["models"]["m"]["fallbacks"] = [f"m{i}" for i in range(1, len(streams))]
    return await start_proxy(cfg)


async def _openai_text(proxy: Proxy) -> tuple[str, set[str], Exception | None]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    text, ids, error = "", set(), None
    try:
        stream = await client.chat.completions.create(model="m", messages=HI, stream=True)
        async for c in stream:
            ids.add(c.id)
            text += "".join(ch.delta.content or "" for ch in c.choices)
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return text, ids, error


async def test_a_spliced_stream_ends_with_an_error_after_the_first_answer(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SPLICED_AFTER_CONTENT)
    text, ids, error = await _openai_text(proxy)
    assert (text, ids) == ("Hello whole", {"c1"})
    assert error is not None and "second answer" in str(error)
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")


async def test_an_anthropic_client_gets_an_error_event_not_the_second_answer(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SPLICED_AFTER_CONTENT)
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    text = ""
    try:
        with pytest.raises(anthropic.APIStatusError, match="second answer"):
            async with claude.messages.stream(model="m", max_tokens=50, messages=HI) as stream:
                async for t in stream.text_stream:
                    text += t
    finally:
        await claude.close()
    assert text == "Hello whole"


async def test_a_splice_before_content_fails_over(start_proxy: StartProxy, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SPLICED_BEFORE_CONTENT, GOOD)
    text, ids, error = await _openai_text(proxy)
    assert (text, ids, error) == ("good", {"g"}, None)
    rec = await recorded(proxy)
    assert (rec.outcome, rec.deployment) == ("ok", "d1")
    assert rec.attempts[0].outcome == "server_error"


# A second answer after the first one's finish: its content was dropped, but its empty role chunk
# went on under its id, then its usage chunk, which the client read, and was charged, as the answer's.
SPLICED_AFTER_FINISH = [
    _chunk("c1", {"role": "assistant", "content": ""}),
    _chunk("c1", {"content": "Hello"}),
    _chunk("c1", {}, "stop"),
    _chunk("c2", {"role": "assistant", "content": ""}),
    _chunk("c2", {"content": "OTHER ANSWER " * 100}),
    _chunk("c2", {}, "stop"),
    b'data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"x","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":300,"total_tokens":303}}\n\n',
    DONE,
]


async def test_a_second_answer_after_the_first_finished_is_neither_relayed_nor_charged(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SPLICED_AFTER_FINISH)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    chunks: list[Any] = []
    try:
        with pytest.raises(openai.APIError, match="second answer"):
            stream = await client.chat.completions.create(
                model="m", messages=HI, stream=True, stream_options={"include_usage": True}
            )
            async for c in stream:
                chunks.append(c)
    finally:
        await client.close()
    assert {c.id for c in chunks} == {"c1"}  # nothing of the second answer
    assert all(c.usage is None for c in chunks)
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == "Hello"
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")
    assert rec.usage is not None and rec.usage.estimated and rec.usage.completion_tokens < 5  # "Hello", not 300


@pytest.mark.parametrize("events", [AZURE_LIKE, ID_PER_CHUNK], ids=["empty-ids", "an-id-a-chunk"])
async def test_ids_that_are_not_a_splice_go_on(
    start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes]
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, events)
    text, _, error = await _openai_text(proxy)
    assert (text, error) == ("fine answer", None)
    rec = await recorded(proxy)
    assert rec.outcome == "ok"


def test_a_burst_read_keeps_the_first_answer_and_stops_at_the_splice() -> None:
    """Events read together: those of the first answer go on, then the error, nothing after it."""
    c = sse.ChatChunks()
    out = c.feed(b"".join(SPLICED_AFTER_CONTENT))
    assert out == b"".join(SPLICED_AFTER_CONTENT[:3]) + sse.SPLICED_EVENT
    assert c.feed(_chunk("c1", {"content": "more"})) == b""


def _of(model: str, cid: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": cid, "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# A second answer of another model, without a role delta, under an empty id (TGI's) or the
# first answer's id (a load balancer that keeps it): the model it names is all that shows it.
SPLICED_MODELS = {
    "empty-ids": [
        _of("llama-3-70b", "", {"role": "assistant", "content": ""}),
        _of("llama-3-70b", "", {"content": "Hello"}),
        _of("llama-3-70b", "", {"content": " whole"}),
        _of("mistral-7b", "", {"content": "OTHER ANSWER"}),
        _of("mistral-7b", "", {}, "stop"),
        DONE,
    ],
    "same-id": [
        _of("llama-3-70b", "c1", {"role": "assistant", "content": ""}),
        _of("llama-3-70b", "c1", {"content": "Hello"}),
        _of("llama-3-70b", "c1", {"content": " whole"}),
        _of("mistral-7b", "c1", {"content": "OTHER ANSWER"}),
        _of("mistral-7b", "c1", {}, "stop"),
        DONE,
    ],
}


@pytest.mark.parametrize("events", list(SPLICED_MODELS.values()), ids=list(SPLICED_MODELS))
async def test_a_second_answer_of_another_model_ends_the_stream(
    start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes]
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, events)
    text, _, error = await _openai_text(proxy)
    assert text == "Hello whole"
    assert error is not None and "second answer" in str(error)
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")


# What must go on as before: Azure's first chunk without a model, then the deployment's name; a
# gateway whose role chunk names its alias and every later chunk the provider's model; the role
# on every chunk (Ollama, TGI) under one model.
MODELS_THAT_ARE_NOT_A_SPLICE = {
    "azure-empty-first": [
        b'data: {"id":"","object":"","created":0,"model":"","choices":[],"prompt_filter_results":[]}\n\n',
        _of("", "a", {"role": "assistant", "content": ""}),
        _of("gpt-4o-2024-08-06", "a", {"content": "fine"}),
        _of("gpt-4o-2024-08-06", "a", {"content": " answer"}),
        _of("gpt-4o-2024-08-06", "a", {}, "stop"),
        DONE,
    ],
    "alias-then-slug": [
        _of("my-alias", "a", {"role": "assistant", "content": ""}),
        _of("openrouter/qwen3", "a", {"content": "fine"}),
        _of("openrouter/qwen3", "a", {"content": " answer"}),
        _of("openrouter/qwen3", "a", {}, "stop"),
        DONE,
    ],
    "role-every-chunk": [
        _of("llama3", "chatcmpl-1", {"role": "assistant", "content": "fine"}),
        _of("llama3", "chatcmpl-1", {"role": "assistant", "content": " answer"}),
        _of("llama3", "chatcmpl-1", {"role": "assistant", "content": ""}, "stop"),
        DONE,
    ],
}


@pytest.mark.parametrize("events", list(MODELS_THAT_ARE_NOT_A_SPLICE.values()), ids=list(MODELS_THAT_ARE_NOT_A_SPLICE))
async def test_models_that_are_not_a_splice_go_on(
    start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes]
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, events)
    text, _, error = await _openai_text(proxy)
    assert (text, error) == ("fine answer", None)
    assert (await recorded(proxy)).outcome == "ok"
