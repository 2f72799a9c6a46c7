"""Streams as some OpenAI-compatible servers write them: lines ended by CR alone (the SSE
specification allows CRLF, LF or CR), and no `[DONE]` after a finished answer. Both are whole
answers: relayed, ended cleanly (no error event the OpenAI SDK raises) and cached."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import Proxy, ServeRoutes
from tests.test_stream_choices_closed import _proxy


def _event(obj: dict[str, Any], end: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(obj) + end


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x", "choices": [choice]}


USAGE = {
    "id": "c",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "x",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
ANSWER = [_chunk({"role": "assistant", "content": "whole"}), _chunk({}, "stop"), USAGE]
STREAMS = {
    "cr-line-ends": [b"".join(_event(o, b"\r\r") for o in ANSWER) + b"data: [DONE]\r\r"],
    "no-done": [_event(o) for o in ANSWER],
    "no-done-cr": [_event(o, b"\r\r") for o in ANSWER],
}


@pytest.mark.parametrize("name", list(STREAMS))
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("keyed", [False, True], ids=["keyless", "keyed"])  # keyed: a translator that wraps
async def test_a_whole_answer_is_whole(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]],
    serve_routes: ServeRoutes,
    name: str,
    include_usage: bool,
    keyed: bool,
) -> None:
    keys = {"keys": {"alice": {"token": "tok-alice-0123456789"}}} if keyed else {}
    proxy, calls = await _proxy(start_proxy, serve_routes, STREAMS[name], **keys)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-alice-0123456789", max_retries=0)
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    try:
        for label in ("miss", "hit"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True, **extra
            )
            chunks = [c async for c in raw.parse()]  # the SDK raises an error event
            assert raw.headers["x-edgeroute-cache"] == label
            assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == "whole"
            assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["stop"]
            usage = [c.usage for c in chunks if c.usage is not None]
            assert [u.total_tokens for u in usage] == ([5] if include_usage else [])
    finally:
        await client.close()
    assert len(calls) == 1
    assert proxy.recorder.records[0].outcome == "ok"


async def test_a_finished_answer_whose_asked_usage_never_came_is_incomplete(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes
) -> None:
    proxy, _ = await _proxy(start_proxy, serve_routes, [_event(o) for o in ANSWER[:-1]])
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        with pytest.raises(openai.APIError, match="incomplete"):
            _ = [c async for c in stream]
    finally:
        await client.close()


@pytest.mark.parametrize("index", [-1, "1", "0"])
async def test_a_finish_for_no_choice_does_not_end_the_answer(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]], serve_routes: ServeRoutes, index: Any
) -> None:
    """A finish whose choice index is no choice at all (-1, a string) cannot make a cut stream
    (choice 0 never finished, no [DONE]) whole: it was ended with a clean [DONE] and logged ok."""
    bogus = _chunk({}, "stop")
    bogus["choices"][0]["index"] = index
    events = [_event(o) for o in (_chunk({"role": "assistant", "content": "cut"}), bogus)]
    proxy, _ = await _proxy(start_proxy, serve_routes, events)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="incomplete"):
            _ = [c async for c in stream]
    finally:
        await client.close()
