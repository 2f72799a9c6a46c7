"""A translated stream ends where its answer ends. What an Anthropic or Bedrock upstream sends
after its finish (text after `message_delta` or `messageStop`), or a chat upstream after its
`finish_reason` for a Responses client, is none of the answer: the OpenAI SDK's text was
"abcLATE", recorded ok, while the cache kept "abc". A second `message_start` (two answers spliced
in one stream: "AAABBB", billed for the second's prompt) is the upstream's protocol error: before
content it fails over, after it the stream ends with an error event."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.bedrock import event_frame
from tests.conftest import Proxy, ServeRoutes, eventually
from tests.providers_fixtures import BEDROCK_OPTIONS
from tests.test_stream_hold_usage_and_format import _streaming

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def _ant(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def _start(mid: str, input_tokens: int) -> bytes:
    usage = {"input_tokens": input_tokens, "output_tokens": 1}
    return _ant("message_start", message={"id": mid, "model": "claude-x", "usage": usage})


def _text(text: str) -> bytes:
    return _ant("content_block_delta", index=0, delta={"type": "text_delta", "text": text})


TEXT_BLOCK = _ant("content_block_start", index=0, content_block={"type": "text", "text": ""})
END_TURN = _ant("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3})
STOP = _ant("message_stop")

LATE_TEXT = [_start("msg_A", 10), TEXT_BLOCK, _text("abc"), END_TURN, _text("LATE"), STOP]
SPLICED = [_start("msg_A", 10), TEXT_BLOCK, _text("AAA"), _start("msg_B", 99), TEXT_BLOCK, _text("BBB"), END_TURN, STOP]
SPLICED_BEFORE_CONTENT = [_start("msg_A", 10), _start("msg_B", 99), TEXT_BLOCK, _text("BBB"), END_TURN, STOP]
WHOLE = [_start("msg_G", 10), TEXT_BLOCK, _text("good"), END_TURN, STOP]


async def _anthropic_proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, *ups: list[bytes]) -> Proxy:
    providers: dict[str, Any] = {}
    for i, events in enumerate(ups):
        up = await serve_routes(web.post("/v1/messages", _streaming(events)))
        providers[f"p{i}"] = {"kind": "anthropic", "base_url": up.url, "api_key": "k"}
    deployments = {f"d{i}": {"provider": f"p{i}", "model": "claude-x", "price": PRICE} for i in range(len(ups))}
    return await start_proxy(
        {"providers": providers, "deployments": deployments, "models": {"m": {"deployments": list(deployments)}}}
    )


async def _record(proxy: Proxy) -> Any:
    async def written() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(written, "the request's record")


async def _openai_stream(proxy: Proxy) -> tuple[str, set[str], list[str], Exception | None]:
    """The OpenAI SDK's text, chunk ids and finish reasons, and the error it raised (if any)."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    text, ids, finishes, error = "", set(), [], None
    try:
        stream: Any = await client.chat.completions.create(model="m", messages=HI, stream=True)  # type: ignore[arg-type]
        async for c in stream:
            ids.add(c.id)
            for ch in c.choices:
                text += ch.delta.content or ""
                finishes += [ch.finish_reason] if ch.finish_reason else []
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return text, ids, finishes, error


async def test_text_after_an_anthropic_answers_end_is_not_relayed(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _anthropic_proxy(start_proxy, serve_routes, LATE_TEXT)
    text, _, finishes, error = await _openai_stream(proxy)
    assert (text, finishes, error) == ("abc", ["stop"], None)
    rec = await _record(proxy)
    assert (rec.outcome, rec.usage.prompt_tokens, rec.usage.completion_tokens) == ("ok", 10, 3)


async def test_a_second_message_after_content_ends_the_stream_with_an_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _anthropic_proxy(start_proxy, serve_routes, SPLICED)
    text, ids, finishes, error = await _openai_stream(proxy)
    assert (text, ids, finishes) == ("AAA", {"msg_A"}, [])
    assert error is not None and "second answer" in str(error)
    rec = await _record(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", "upstream_error")
    assert rec.usage.prompt_tokens == 10  # the first message's prompt, not the spliced one's 99


async def test_a_second_message_before_content_fails_over(start_proxy: StartProxy, serve_routes: ServeRoutes) -> None:
    proxy = await _anthropic_proxy(start_proxy, serve_routes, SPLICED_BEFORE_CONTENT, WHOLE)
    text, ids, finishes, error = await _openai_stream(proxy)
    assert (text, ids, finishes, error) == ("good", {"msg_G"}, ["stop"], None)
    rec = await _record(proxy)
    assert (rec.outcome, rec.deployment) == ("ok", "d1")
    assert rec.attempts[0].outcome == "server_error"


def _bedrock_stream(*frames: tuple[str, dict[str, Any]]) -> list[bytes]:
    return [event_frame(kind, obj) for kind, obj in frames]


_BR_START = ("messageStart", {"role": "assistant"})
_BR_META = ("metadata", {"usage": {"inputTokens": 10, "outputTokens": 3}})


def _br_text(text: str) -> tuple[str, dict[str, Any]]:
    return ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})


_BR_STOP = ("messageStop", {"stopReason": "end_turn"})
BR_LATE_TEXT = [_BR_START, _br_text("abc"), _BR_STOP, _br_text("LATE"), _BR_META]
BR_SPLICED = [_BR_START, _br_text("AAA"), _BR_START, _br_text("BBB"), _BR_STOP, _BR_META]


@pytest.mark.parametrize(
    ("frames", "want_text", "want_error"),
    [(BR_LATE_TEXT, "abc", None), (BR_SPLICED, "AAA", "second answer")],
    ids=["text-after-stop", "second-message"],
)
async def test_a_bedrock_stream_ends_with_its_message(
    start_proxy: StartProxy,
    serve_routes: ServeRoutes,
    frames: list[tuple[str, dict[str, Any]]],
    want_text: str,
    want_error: str | None,
) -> None:
    up = await serve_routes(web.post("/model/{model}/converse-stream", _streaming(_bedrock_stream(*frames))))
    proxy = await start_proxy(
        {
            "providers": {"b": {"kind": "bedrock", "base_url": up.url, "options": BEDROCK_OPTIONS}},
            "deployments": {"d": {"provider": "b", "model": "anthropic.claude-x", "price": PRICE}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    text, _, finishes, error = await _openai_stream(proxy)
    assert text == want_text
    if want_error is None:
        assert (finishes, error) == (["stop"], None)
    else:
        assert error is not None and want_error in str(error) and not finishes


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def test_a_responses_client_gets_the_chat_answer_to_its_finish(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    """A Responses client served by a chat-only deployment: "LATE" after the finish is dropped."""
    events = [
        _chunk({"role": "assistant", "content": "abc"}),
        _chunk({}, "stop"),
        _chunk({"content": "LATE"}),
        b"data: [DONE]\n\n",
    ]
    up = await serve_routes(web.post("/v1/chat/completions", _streaming(events)))
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        async with client.responses.stream(model="m", input="hi") as stream:
            final = await stream.get_final_response()
    finally:
        await client.close()
    assert (final.output_text, final.status) == ("abc", "completed")


def _event(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _response(rid: str, status: str = "in_progress", **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": 1, "status": status, "model": "x", "output": [], **extra}


def _text_events(iid: str, text: str, seq: int) -> list[bytes]:
    item = {"type": "message", "id": iid, "status": "in_progress", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"item_id": iid, "output_index": 0, "content_index": 0}
    return [
        _event({"type": "response.output_item.added", "output_index": 0, "item": item, "sequence_number": seq}),
        _event({"type": "response.content_part.added", **at, "part": part, "sequence_number": seq + 1}),
        _event({"type": "response.output_text.delta", **at, "delta": text, "sequence_number": seq + 2}),
    ]


BOOM = {"code": "server_error", "message": "boom"}
FAILED_AFTER_CONTENT = [
    _event({"type": "response.created", "response": _response("resp_A"), "sequence_number": 0}),
    *_text_events("msg_A", "AAA", 1),
    _event({"type": "response.failed", "response": _response("resp_A", "failed", error=BOOM), "sequence_number": 4}),
]
TWO_RESPONSES = [
    _event({"type": "response.created", "response": _response("resp_A"), "sequence_number": 0}),
    *_text_events("msg_A", "AAA", 1),
    _event({"type": "response.created", "response": _response("resp_B"), "sequence_number": 4}),
    *_text_events("msg_B", "BBB", 5),
]


@pytest.mark.parametrize(
    ("events", "error_class"),
    [(FAILED_AFTER_CONTENT, "upstream_error"), (TWO_RESPONSES, "upstream_error")],
    ids=["failed-after-content", "second-response"],
)
async def test_a_native_responses_stream_that_breaks_after_content_is_not_ok(
    start_proxy: StartProxy, serve_routes: ServeRoutes, events: list[bytes], error_class: str
) -> None:
    """`response.failed` after content is relayed (the upstream's words) but is a broken stream,
    where it was recorded ok; a second `response.created` is not relayed (the SDK raised
    "Lifecycle response identity changed")."""
    up = await serve_routes(web.post("/v1/responses", _streaming(events)))
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.url + "/v1"}},
            "deployments": {"d": {"provider": "p", "model": "x", "price": PRICE}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    deltas: list[str] = []
    kinds: list[str] = []
    try:
        with pytest.raises((openai.APIError, RuntimeError)) as e:
            async with client.responses.stream(model="m", input="hi") as stream:
                async for ev in stream:
                    kinds.append(ev.type)
                    deltas += [ev.delta] if ev.type == "response.output_text.delta" else []
                await stream.get_final_response()
    finally:
        await client.close()
    assert deltas == ["AAA"] and kinds.count("response.created") == 1
    assert "identity" not in str(e.value)
    rec = await _record(proxy)
    assert (rec.outcome, rec.error_class) == ("stream_interrupted", error_class)
