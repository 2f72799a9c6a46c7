"""A stream cut by `data: [DONE]` before its end is a cut stream, whatever API the client speaks.

The dispatch layer takes `[DONE]` as a stream's clean end. A Responses stream (and an Anthropic
one) has no `[DONE]`: an upstream that sent one after some text but before its terminal event
(`response.completed`, `message_stop`) had its stream closed with nothing more, recorded as
`ok`; the OpenAI SDK's stream helper raised a RuntimeError (no `openai.APIError`). A chat
upstream's `[DONE]` without a `finish_reason` became `response.completed` for a Responses
client and `stop_reason: end_turn` for an Anthropic one: a cut answer shown as complete. Each
now ends as a stream that stops early: an `error` event in the client's format, the request
recorded `stream_interrupted` and the deployment blamed for a broken stream, billed for what
was relayed. An Anthropic client served through the chat path (an OpenAI-format deployment) got
the error event, but its request was recorded `ok` and the deployment's health counted a
success: the relay took the chat stream's `[DONE]` as its clean end. It is now recorded as any
cut stream is.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest

from edgeroute.state import STATE
from tests.conftest import eventually
from tests.security import test_careless_upstream_native_events as messages_events
from tests.security import test_careless_upstream_responses_events as responses_events
from tests.security.conftest import ScriptedStreams, Served, failover_config

USER: Any = [{"role": "user", "content": "hi"}]
DONE = b"data: [DONE]\n\n"
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}
CHAT_CUT = (
    b"data: "
    + orjson.dumps({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "partial"}}]})
    + b"\n\n"
    + DONE
)


async def _outcome(proxy: Served) -> str:
    return (await _ended(proxy))[0]


async def _ended(proxy: Served) -> tuple[str, str | None, int]:
    """The request's recorded outcome and error class, and the failures its deployment's health counts."""

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    return str(rec.outcome), rec.error_class, proxy.app[STATE].live.router.health(0)["failures"]


async def _responses_stream(proxy: Served) -> tuple[str, list[str], str]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    text, error = "", ""
    kinds: list[str] = []
    async with await client.responses.create(model="m", input="hi", stream=True) as events:
        async for ev in events:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
            elif ev.type == "error":
                error = ev.message
    return text, kinds, error


@pytest.mark.parametrize("native", [True, False], ids=["responses-upstream", "chat-upstream"])
async def test_a_responses_stream_cut_by_done_ends_with_an_error(native: bool, serve: Any) -> None:
    e = responses_events
    ups = ScriptedStreams("/v1/responses" if native else "/v1/chat/completions")
    up = await ups(e.HEAD + e.DELTA + DONE if native else CHAT_CUT)
    proxy: Served = await serve(failover_config(up, kind="openai" if native else "openai_compatible"))
    text, kinds, error = await _responses_stream(proxy)
    await ups.close()
    assert text == "partial"
    assert kinds[-1] == "error" and error, kinds
    assert "response.completed" not in kinds
    assert await _outcome(proxy) == "stream_interrupted"


@pytest.mark.parametrize("native", [True, False], ids=["anthropic-upstream", "chat-upstream"])
async def test_an_anthropic_stream_cut_by_done_ends_with_an_error(native: bool, serve: Any) -> None:
    m = messages_events
    ups = ScriptedStreams("/v1/messages" if native else "/v1/chat/completions")
    up = await ups(m.START + m.BLOCK + m.DELTA + DONE if native else CHAT_CUT)
    proxy: Served = await serve(failover_config(up, kind="anthropic" if native else "openai_compatible"))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    kinds: list[str] = []
    with pytest.raises(anthropic.APIStatusError):
        # top_k: only Anthropic understands it, so a native request and its events go through unchanged
        extra = {"top_k": 3} if native else {}
        async with client.messages.stream(model="m", max_tokens=10, messages=USER, extra_body=extra) as s:
            async for ev in s:
                kinds.append(ev.type)
    await ups.close()
    assert "message_stop" not in kinds and "message_delta" not in kinds, kinds
    # Natively, or through the chat path (nothing the translation loses): a cut stream either way.
    assert await _ended(proxy) == ("stream_interrupted", "stream_incomplete", 1)


@pytest.mark.parametrize("client", ["anthropic", "responses"])
@pytest.mark.parametrize("cut", [CHAT_CUT, CHAT_CUT.removesuffix(DONE)], ids=["done-before-finish", "closed"])
async def test_a_chat_stream_cut_short_is_recorded_alike_whatever_the_client(
    client: str, cut: bytes, serve: Any
) -> None:
    """A chat upstream's stream cut after some text, by a `[DONE]` or by its connection's end:
    an Anthropic client and a Responses client, each served through the chat path, see an
    error event, and each request is recorded as interrupted, the deployment blamed once."""
    ups = ScriptedStreams("/v1/chat/completions")
    proxy: Served = await serve(failover_config(await ups(cut), kind="openai_compatible"))
    if client == "responses":
        kinds = (await _responses_stream(proxy))[1]
        assert kinds[-1] == "error" and "response.completed" not in kinds, kinds
    else:
        anth = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as failed:
            async with anth.messages.stream(model="m", max_tokens=10, messages=USER) as s:
                async for ev in s:
                    assert ev.type not in ("message_delta", "message_stop")  # never shown as complete
        assert "incomplete" in str(failed.value)
    await ups.close()
    assert await _ended(proxy) == ("stream_interrupted", "stream_incomplete", 1)
