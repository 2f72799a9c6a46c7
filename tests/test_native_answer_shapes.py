"""A Gemini or Bedrock answer in a shape its protocol does not have (a field of another type: a
string where a list of objects goes, a part that is not an object, a text that is a number, a
missing `stopReason`), JSON or streamed, is that deployment's failure: failed over before the
client saw anything, an error event in the client's format after (`upstream_protocol_error`),
the deployment's health charged, and said in one log line without a traceback. Each such shape
raised whatever its first use raised (an AttributeError, a TypeError, a KeyError): a traceback
per attempt, and some were served as garbage (a text `{'a': 1}`, an empty answer).

Through the real proxy with the `openai` and `anthropic` SDKs; the upstreams speak the wire
formats (Gemini's `streamGenerateContent?alt=sse`, Bedrock's event-stream frames)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.bedrock import encode_frame, event_frame
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.providers_fixtures import BEDROCK_OPTIONS
from tests.test_answers_in_200_that_are_not import _deployments
from tests.test_native_stream_error_classes import _openai_stream
from tests.test_stream_hold_usage_and_format import _streaming

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]


def _gemini_answer(text: str) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1},
        "modelVersion": "gemini-x",
    }


def _bedrock_answer(text: str) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 3, "outputTokens": 1},
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


def _gemini_stream(text: str) -> list[bytes]:
    return [_sse(_gemini_answer(text))]


BR_START = event_frame("messageStart", {"role": "assistant"})


def _br_text(text: str) -> bytes:
    return event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})


def _bedrock_stream(text: str) -> list[bytes]:
    return [
        BR_START,
        _br_text(text),
        event_frame("contentBlockStop", {"contentBlockIndex": 0}),
        event_frame("messageStop", {"stopReason": "end_turn"}),
        event_frame("metadata", {"usage": {"inputTokens": 3, "outputTokens": 1}}),
    ]


def _with(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """`base` with the field at `path` set to `value` (removed when `value` is `_GONE`)."""
    out = copy.deepcopy(base)
    at = out
    for key in path[:-1]:
        at = at[key]
    if value is _GONE:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return out


_GONE = object()
G = _gemini_answer("from a")
B = _bedrock_answer("from a")
PART = ("candidates", 0, "content", "parts", 0)
BLOCK = ("output", "message", "content", 0)

# (kind, JSON answer, what the log line says of it)
JSON_SHAPES: list[tuple[str, dict[str, Any], str]] = [
    ("gemini", _with(G, ("candidates",), "hi"), "`candidates` is not a list of objects"),
    ("gemini", _with(G, ("candidates",), {"0": G["candidates"][0]}), "`candidates` is not a list of objects"),
    ("gemini", _with(G, ("candidates",), ["hi"]), "`candidates` is not a list of objects"),
    ("gemini", _with(G, ("candidates",), []), "no candidate"),
    ("gemini", _with(G, ("candidates", 0), {"index": 0}), "neither content nor a finishReason"),
    ("gemini", _with(G, ("candidates", 0, "content"), "hi"), "content` is not an object"),
    ("gemini", _with(G, ("candidates", 0, "content", "parts"), "hi"), "parts` is not a list of objects"),
    ("gemini", _with(G, ("candidates", 0, "content", "parts"), ["hi"]), "parts` is not a list of objects"),
    ("gemini", _with(G, (*PART, "text"), 5), "text` is not a string"),
    ("gemini", _with(G, (*PART, "text"), {"a": 1}), "text` is not a string"),
    ("gemini", _with(G, PART, {"functionCall": "f"}), "functionCall` is not an object"),
    ("gemini", _with(G, PART, {"functionCall": {"name": ["f"]}}), "name` is not a string"),
    ("gemini", _with(G, PART, {"functionCall": {"name": "f", "args": 5}}), "args` is not an object"),
    ("gemini", _with(G, ("candidates", 0, "finishReason"), ["STOP"]), "finishReason` is not a string"),
    ("bedrock", _with(B, ("output",), "hi"), "`output` is not an object"),
    ("bedrock", _with(B, ("output", "message"), ["hi"]), "`output.message` is not an object"),
    ("bedrock", _with(B, ("output", "message", "content"), "hi"), "content` is not a list of objects"),
    ("bedrock", _with(B, ("output", "message", "content"), _GONE), "content` is not a list of objects"),
    ("bedrock", _with(B, ("output", "message", "content"), ["hi"]), "content` is not a list of objects"),
    ("bedrock", _with(B, (*BLOCK, "text"), 5), "text` is not a string"),
    ("bedrock", _with(B, BLOCK, {"toolUse": "f"}), "toolUse` is not an object"),
    ("bedrock", _with(B, BLOCK, {"toolUse": None}), "toolUse` is not an object"),
    ("bedrock", _with(B, BLOCK, {"toolUse": {"toolUseId": "t", "name": "f", "input": [1]}}), "input` is not an"),
    ("bedrock", _with(B, BLOCK, {"toolUse": {"toolUseId": 1, "name": "f", "input": {}}}), "toolUseId` is not a"),
    ("bedrock", _with(B, ("stopReason",), _GONE), "stopReason` is not a string"),
    ("bedrock", _with(B, ("stopReason",), 5), "stopReason` is not a string"),
]


def _gemini_chunk(path: tuple[Any, ...], value: Any) -> bytes:
    return _sse(_with(_gemini_answer("x"), path, value))


def _frame(kind: str, payload: bytes) -> bytes:
    return encode_frame({":message-type": "event", ":event-type": kind, ":content-type": "application/json"}, payload)


# (kind, the careless event(s), what the log line says of it): sent first, or after "half".
STREAM_SHAPES: list[tuple[str, list[bytes], str]] = [
    ("gemini", [_gemini_chunk(("candidates",), "hi")], "`candidates` is not a list of objects"),
    ("gemini", [_gemini_chunk(("candidates", 0, "content"), ["x"])], "content` is not an object"),
    ("gemini", [_gemini_chunk(("candidates", 0, "content", "parts"), "x")], "parts` is not a list of objects"),
    ("gemini", [_gemini_chunk(PART, "x")], "parts` is not a list of objects"),
    ("gemini", [_gemini_chunk((*PART, "text"), {"a": 1})], "text` is not a string"),
    ("gemini", [_gemini_chunk(PART, {"functionCall": None})], "functionCall` is not an object"),
    ("gemini", [_gemini_chunk(("candidates", 0, "finishReason"), {"r": 1})], "finishReason` is not a string"),
    ("gemini", [_sse({"candidates": [], "promptFeedback": "blocked"})], "promptFeedback` is not an object"),
    ("bedrock", [event_frame("contentBlockDelta", {"contentBlockIndex": "0", "delta": {"text": "x"}})], "an index"),
    ("bedrock", [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": "x"})], "`delta` is not an"),
    ("bedrock", [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": 5}})], "text` is not a"),
    ("bedrock", [event_frame("contentBlockStart", {"contentBlockIndex": 1, "start": "x"})], "`start` is not an"),
    ("bedrock", [event_frame("contentBlockStart", {"start": {"toolUse": ["f"]}})], "toolUse` is not an object"),
    ("bedrock", [_frame("contentBlockDelta", b"[1]")], "not a JSON object"),
    ("bedrock", [_frame("contentBlockDelta", b"{")], "not JSON"),
    ("bedrock", [event_frame("messageStop", {})], "stopReason` is not a string"),
]


def _handler(json_body: dict[str, Any], stream: list[bytes], calls: list[str]) -> Any:
    streaming = _streaming(stream)

    async def handle(request: web.Request) -> web.StreamResponse:
        calls.append(request.path)
        if request.path.endswith(("converse", ":generateContent")):
            return web.Response(body=orjson.dumps(json_body), content_type="application/json")
        return await streaming(request)  # Bedrock's clients read its frames whatever the type says

    return handle


async def _proxy(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, bad: tuple[dict[str, Any], list[bytes]]
) -> tuple[Proxy, list[str], list[str]]:
    """Model `m` on the careless deployment `d-a`, falling back to a good one (`d-b`) of its kind."""
    good = (_gemini_answer("from b"), _gemini_stream("from b")) if kind == "gemini" else None
    good = good or (_bedrock_answer("from b"), _bedrock_stream("from b"))
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {}}
    calls: dict[str, list[str]] = {"a": [], "b": []}
    for name, (body, stream) in (("a", bad), ("b", good)):
        handle = _handler(body, stream, calls[name])
        up = await serve_routes(
            web.post("/v1beta/models/{target}", handle), web.post("/model/{model}/{action}", handle)
        )
        if kind == "gemini":
            cfg["providers"][name] = {"kind": "gemini", "base_url": up.url + "/v1beta", "api_key": "k"}
        else:
            cfg["providers"][name] = {"kind": "bedrock", "base_url": up.url, "options": BEDROCK_OPTIONS}
        price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
        cfg["deployments"][f"d-{name}"] = {"provider": name, "model": f"{kind}-x", "price": price}
    cfg["models"] = {"m": {"deployments": ["d-a"], "fallbacks": ["m-b"]}, "m-b": {"deployments": ["d-b"]}}
    cfg["retry"] = {"base_ms": 1, "max_ms": 5, "max_retry_after_s": 0}
    return await start_proxy(cfg), calls["a"], calls["b"]


async def _ask(proxy: Proxy) -> tuple[Any, Any]:
    """A JSON chat answer to the `openai` SDK, and the request's record."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        return await client.chat.completions.create(model="m", messages=HI), await recorded(proxy)
    finally:
        await client.close()


def _no_traceback(caplog: pytest.LogCaptureFixture, said: str) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a careless answer logged a traceback:\n" + caplog.text
    assert any(said in r.getMessage() for r in caplog.records), caplog.text


async def _charged(proxy: Proxy) -> None:
    deployments = await _deployments(proxy)
    assert deployments["d-a"]["failures"] >= 1 and deployments["d-b"]["failures"] == 0, deployments


def _ids(rows: list[Any]) -> list[str]:
    return [f"{row[0]}-{i}" for i, row in enumerate(rows)]


@pytest.mark.parametrize(("kind", "body", "said"), JSON_SHAPES, ids=_ids(JSON_SHAPES))
async def test_a_json_answer_of_another_shape_fails_over(
    start_proxy: StartProxy,
    serve_routes: ServeRoutes,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    body: dict[str, Any],
    said: str,
) -> None:
    proxy, a, b = await _proxy(start_proxy, serve_routes, kind, (body, []))
    with caplog.at_level(logging.INFO):
        got, rec = await _ask(proxy)
    assert got.choices[0].message.content == "from b"
    assert len(a) >= 1 and len(b) == 1
    assert rec.deployment == "d-b" and rec.attempts[0].outcome == "server_error"
    _no_traceback(caplog, said)
    await _charged(proxy)


HALF = {
    "gemini": [_sse({"candidates": [{"content": {"parts": [{"text": "half"}]}}]})],
    "bedrock": [BR_START, _br_text("half")],
}


@pytest.mark.parametrize("after", ["", "half"], ids=["before-content", "after-content"])
@pytest.mark.parametrize(("kind", "events", "said"), STREAM_SHAPES, ids=_ids(STREAM_SHAPES))
async def test_a_stream_event_of_another_shape(
    start_proxy: StartProxy,
    serve_routes: ServeRoutes,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    events: list[bytes],
    said: str,
    after: str,
) -> None:
    """Before content it fails over; after it the stream ends with the upstream's protocol error."""
    head = HALF[kind] if after else ([] if kind == "gemini" else [BR_START])
    proxy, a, b = await _proxy(start_proxy, serve_routes, kind, ({}, [*head, *events]))
    with caplog.at_level(logging.INFO):
        text, error = await _openai_stream(proxy)
        rec = await recorded(proxy)
    assert len(a) == 1
    if after:
        assert text == "half" and not b
        assert error is not None and error.code == "upstream_protocol_error", error
        assert rec.outcome == "stream_interrupted" and rec.error_class == "upstream_protocol_error"
    else:
        assert (text, error) == ("from b", None) and len(b) == 1
        assert rec.deployment == "d-b" and rec.attempts[0].outcome == "server_error"
    _no_traceback(caplog, said)
    await _charged(proxy)


@pytest.mark.parametrize("kind", ["gemini", "bedrock"])
async def test_an_anthropic_client_gets_the_error_in_its_format(
    start_proxy: StartProxy, serve_routes: ServeRoutes, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    careless = _gemini_chunk(PART, 5) if kind == "gemini" else event_frame("contentBlockDelta", {"delta": 5})
    stream = [*HALF[kind], careless]
    proxy, _, _ = await _proxy(start_proxy, serve_routes, kind, ({}, stream))
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    text = ""
    with caplog.at_level(logging.INFO), pytest.raises(anthropic.APIStatusError) as got:
        async with claude.messages.stream(model="m", max_tokens=50, messages=HI) as events:
            async for piece in events.text_stream:
                text += piece
    await claude.close()
    assert text == "half"
    body = got.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error", body
    assert not [r for r in caplog.records if r.exc_info], caplog.text


USAGES: list[tuple[str, dict[str, Any]]] = [
    ("gemini", _with(G, ("usageMetadata",), {"promptTokenCount": "3", "candidatesTokenCount": 1})),
    ("gemini", _with(G, ("usageMetadata",), {"promptTokenCount": -3, "candidatesTokenCount": -1})),
    ("gemini", _with(G, ("usageMetadata",), ["3"])),
    ("bedrock", _with(B, ("usage",), {"inputTokens": -3, "outputTokens": "1"})),
    ("bedrock", _with(B, ("usage",), "many")),
]


@pytest.mark.parametrize(("kind", "body"), USAGES, ids=_ids(USAGES))
async def test_usage_of_another_shape_is_counted_not_failed(
    start_proxy: StartProxy,
    serve_routes: ServeRoutes,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    body: dict[str, Any],
) -> None:
    """Usage that is not counts costs a good answer nothing but its count: served, counted from
    its text (as the other formats' is), without a traceback."""
    proxy, _, b = await _proxy(start_proxy, serve_routes, kind, (body, []))
    with caplog.at_level(logging.INFO):
        got, rec = await _ask(proxy)
    assert got.choices[0].message.content == "from a" and not b
    assert got.usage is None or (got.usage.prompt_tokens >= 0 and got.usage.completion_tokens >= 0)
    assert rec.status == 200 and rec.cost_usd > 0
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("after", ["", "half"], ids=["before-content", "after-content"])
async def test_a_gemini_error_chunk_with_its_code_as_text_keeps_its_class(
    start_proxy: StartProxy, serve_routes: ServeRoutes, after: str
) -> None:
    """`"code": "429"` (a gateway's) is a rate limit as `429` is: it failed over as a server error
    (no cool-down), and reached the client after content as `api_error`."""
    error = _sse({"error": {"code": "429", "message": "Quota exceeded for the minute."}})
    proxy, _, b = await _proxy(start_proxy, serve_routes, "gemini", ({}, [*(HALF["gemini"] if after else []), error]))
    text, got = await _openai_stream(proxy)
    rec = await recorded(proxy)
    if after:
        assert text == "half" and not b
        assert got is not None and got.type == "rate_limit_error" and "Quota exceeded" in got.message, got
    else:
        assert (text, got) == ("from b", None)
        assert rec.attempts[0].outcome == "rate_limited"


async def test_a_gemini_error_that_is_a_text_reaches_the_client(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    """`"error": "..."` (not Google's object) after content ends the stream with the upstream's
    words as a server error: it was dropped, and the client read "ended the stream early"."""
    error = _sse({"error": "Quota exceeded for the minute."})
    proxy, _, _ = await _proxy(start_proxy, serve_routes, "gemini", ({}, [*HALF["gemini"], error]))
    text, got = await _openai_stream(proxy)
    assert text == "half"
    assert got is not None and got.type == "api_error" and got.message == "Quota exceeded for the minute.", got
