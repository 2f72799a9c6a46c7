"""A stream request answered with a whole JSON answer (a server that ignores `stream: true`):
served as the stream of that answer, once, and charged by its usage. It was a failure retried
on the same deployment, each answer paid for and priced at its prompt alone, then a 502."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import eventually
from tests.test_providers_careless_answers import raw_upstream

__all__ = ["raw_upstream"]

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "x",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2000, "total_tokens": 2010},
}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "x",
    "content": [
        {"type": "text", "text": "hello there"},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 2000},
}


def _config(url: str, kind: str = "openai_compatible") -> dict[str, Any]:
    return {
        "providers": {
            "p": {"kind": kind, "base_url": url + "/v1" if kind == "openai_compatible" else url, "api_key": "k"}
        },
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def _record(proxy: Any) -> Any:
    async def written() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(written, "the request's record")


def _charged(rec: Any) -> None:
    assert [a.deployment for a in rec.attempts] == ["d"]  # one attempt: never retried
    usage = rec.attempts[0].usage
    assert usage is not None and usage.completion_tokens == 2000 and not usage.estimated
    assert rec.attempts[0].cost_usd == pytest.approx(2010 / 1e6)


async def test_chat_stream_answered_with_json(start_proxy, raw_upstream) -> None:
    proxy = await start_proxy(_config(await raw_upstream(CHAT)))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hi"}]
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
        usage = chunk.usage or usage
    assert (text, finish) == ("hello there", "stop")
    assert usage is not None and usage.completion_tokens == 2000
    rec = await _record(proxy)
    assert rec.status == 200
    _charged(rec)


async def test_messages_stream_answered_with_json(start_proxy, raw_upstream) -> None:
    # Through the chat translation (an OpenAI-format upstream), and from an Anthropic upstream
    # (`top_k`: the request goes as sent).
    for kind, answer, extra in (("openai_compatible", CHAT, {}), ("anthropic", MESSAGE, {"top_k": 5})):
        proxy = await start_proxy(_config(await raw_upstream(answer), kind))
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}], extra_body=extra
        ) as stream:
            msg = await stream.get_final_message()
        assert msg.content[0].type == "text" and msg.content[0].text == "hello there", kind
        if kind == "anthropic":
            assert msg.content[1].type == "tool_use" and msg.content[1].input == {"city": "Paris"}
            assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 2000
        rec = await _record(proxy)
        assert rec.status == 200, kind
        _charged(rec)


async def test_completions_stream_answered_with_json(start_proxy, raw_upstream) -> None:
    text = {
        **CHAT,
        "object": "text_completion",
        "choices": [{"index": 0, "text": "hello there", "finish_reason": "stop"}],
    }
    proxy = await start_proxy(_config(await raw_upstream(text)))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = ""
    async for chunk in await client.completions.create(model="m", prompt="hi", stream=True):
        got += "".join(c.text for c in chunk.choices)
    assert got == "hello there"
    _charged(await _record(proxy))


async def test_responses_stream_answered_with_json_is_charged_once(start_proxy, raw_upstream) -> None:
    # A Responses stream is not made here from a JSON answer: refused, charged by its usage.
    proxy = await start_proxy(_config(await raw_upstream(CHAT)))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        async for _ in await client.responses.create(model="m", input="hi", stream=True):
            pass
    assert e.value.status_code == 502
    rec = await _record(proxy)
    assert [a.deployment for a in rec.attempts] == ["d"]  # the same answer, paid again: not asked again
    assert rec.attempts[0].usage is not None and rec.attempts[0].usage.completion_tokens == 2000
