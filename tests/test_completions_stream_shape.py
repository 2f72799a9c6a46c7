"""A `/v1/completions` stream is a legacy completions client's: an upstream that streams chat
chunks (`chat.completion.chunk`, `choices[].delta`) to it is a careless one. Relayed as they
came, the OpenAI SDK's `choices[0].text` was None on every chunk of a 200, recorded as served.
Before any byte reached the client the attempt fails over; after, the stream ends with an
error event in OpenAI's format and no chat chunk is relayed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson

from tests import test_stream_spliced_ids as spliced_ids
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_stream_spliced_ids import DONE, _chunk

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]


def _text(cid: str, text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    obj = {"id": cid, "object": "text_completion", "created": 1, "model": "x", "choices": [choice]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHAT_STREAM = [
    _chunk("c", {"role": "assistant", "content": ""}),
    _chunk("c", {"content": "chat words"}),
    _chunk("c", {}, "stop"),
    DONE,
]
CHAT_AFTER_TEXT = [
    _text("t", "Hello"),
    _text("t", " there"),
    _chunk("t", {"content": "chat words"}),
    _chunk("t", {}, "stop"),
    DONE,
]
GOOD = [_text("g", "good"), _text("g", "", "stop"), DONE]


async def _proxy(start_proxy: StartProxy, serve_routes: ServeRoutes, *streams: list[bytes]) -> Proxy:
    return await spliced_ids._proxy(start_proxy, serve_routes, *streams, path="/v1/completions")


async def _completion_text(proxy: Proxy) -> tuple[list[Any], Exception | None]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    texts: list[Any] = []
    error: Exception | None = None
    try:
        stream = await client.completions.create(model="m", prompt="hi", stream=True)
        async for c in stream:
            texts.extend(ch.text for ch in c.choices)
    except openai.APIError as e:
        error = e
    finally:
        await client.close()
    return texts, error


async def test_chat_chunks_before_any_text_fail_over(start_proxy: StartProxy, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(start_proxy, serve_routes, CHAT_STREAM, GOOD)
    texts, error = await _completion_text(proxy)
    assert (texts, error) == (["good", ""], None)
    rec = await recorded(proxy)
    assert (rec.outcome, rec.deployment) == ("ok", "d1")
    assert rec.attempts[0].outcome == "server_error"


async def test_chat_chunks_after_text_end_the_stream_with_an_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, CHAT_AFTER_TEXT, GOOD)
    texts, error = await _completion_text(proxy)
    # No chat chunk reached the client (its text None); the events read with it are dropped too.
    assert texts in (["Hello"], ["Hello", " there"])
    assert isinstance(error, openai.APIError) and "chat" in str(error), error
    rec = await recorded(proxy)
    assert (rec.outcome, rec.error_class, rec.deployment) == ("stream_interrupted", "upstream_protocol_error", "d0")
    assert rec.usage is not None and rec.usage.completion_tokens > 0  # what was relayed is charged


SPLICED_AFTER_TEXT = [_text("t1", "Hello"), _text("t1", " there"), _text("t2", "OTHER"), _text("t2", "", "stop"), DONE]


async def test_text_of_another_completion_ends_the_stream_with_an_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, SPLICED_AFTER_TEXT)
    texts, error = await _completion_text(proxy)
    assert texts == ["Hello", " there"]
    assert isinstance(error, openai.APIError) and "second answer" in str(error), error
