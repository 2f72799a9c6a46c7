"""A stream cut by `data: [DONE]` before its end is a cut stream, whatever API the client speaks.

The dispatch layer takes `[DONE]` as a stream's clean end. A Responses stream (and an Anthropic
one) has no `[DONE]`: an upstream that sent one after some text but before its terminal event
(`response.completed`, `message_stop`) had its stream closed with nothing more, recorded as
`ok`; the OpenAI SDK's stream helper raised a RuntimeError (no `openai.APIError`). A chat
upstream's `[DONE]` without a `finish_reason` became `response.completed` for a Responses
client and `stop_reason: end_turn` for an Anthropic one: a cut answer shown as complete. Each
now ends as a stream that stops early: an `error` event in the client's format, the request
recorded `stream_interrupted` (but an Anthropic request served through the chat path, which
records it as chat does), billed for what was relayed.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest

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
    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return str((await eventually(recorded, "the request's record")).outcome)


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
    # Served through the chat path (nothing the translation loses), whose relay records a chat
    # stream without a finish_reason as it relays it to chat clients: as it came.
    assert await _outcome(proxy) == ("stream_interrupted" if native else "ok")
