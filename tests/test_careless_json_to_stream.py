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
        # `max_tokens` above the answers' 2,000 reported tokens: past it they are capped (`cost.overreport`).
        async with client.messages.stream(
            model="m", max_tokens=2000, messages=[{"role": "user", "content": "hi"}], extra_body=extra
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


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "x",
    "output": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thought"}]},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "hello there", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
    ],
    "usage": {"input_tokens": 10, "output_tokens": 2000, "total_tokens": 2010},
}


async def test_responses_stream_answered_with_json(start_proxy, raw_upstream) -> None:
    # Was: refused (a 502), though charged. Now its Responses events, through the chat translation
    # and from an upstream that speaks Responses, read by the SDK as the answer.
    for answer, options in ((CHAT, {}), (RESPONSE, {"responses": True})):
        config = _config(await raw_upstream(answer))
        config["providers"]["p"]["options"] = options
        proxy = await start_proxy(config)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        async with client.responses.stream(model="m", input="hi") as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        assert "".join(deltas) == final.output_text == "hello there", options
        assert final.status == "completed" and final.usage is not None and final.usage.output_tokens == 2000
        if options:
            assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
            call = final.output[2]
            assert call.type == "function_call" and call.arguments == '{"city": "Paris"}'
        rec = await _record(proxy)
        assert rec.status == 200, options
        _charged(rec)
    # An answer cut at its length is delivered as such (`response.incomplete`).
    cut = {**RESPONSE, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    config = _config(await raw_upstream(cut))
    config["providers"]["p"]["options"] = {"responses": True}
    proxy = await start_proxy(config)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    kinds = [e.type async for e in await client.responses.create(model="m", input="hi", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"


async def test_responses_stream_answered_with_json_binds_its_container(start_proxy, raw_upstream, tmp_path) -> None:
    # With tenants, the code interpreter container a JSON answer named is its caller's, as a
    # stream's is: Bob goes on in it, Alice is refused it.
    ran = {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_bob", "code": "print(1)",
           "outputs": [], "status": "completed"}  # fmt: skip
    config = _config(await raw_upstream({**RESPONSE, "output": [ran, *RESPONSE["output"]]}))
    config["providers"]["p"]["options"] = {"responses": True}
    config["ledger"] = {"path": str(tmp_path / "l.db")}
    config["keys"] = {"alice": {"token": "sk-alice-1", "team": "alice"}, "bob": {"token": "sk-bob-1", "team": "bob"}}
    proxy = await start_proxy(config)

    def tools(container: Any) -> Any:
        return [{"type": "code_interpreter", "container": container}]

    bob = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-bob-1", max_retries=0)
    async with bob.responses.stream(model="m", input="run it", tools=tools({"type": "auto"})) as stream:
        final = await stream.get_final_response()
    assert final.output[0].type == "code_interpreter_call" and final.output[0].container_id == "cntr_bob"
    again = await bob.responses.create(model="m", input="go on", tools=tools("cntr_bob"))
    assert again.status == "completed"
    alice = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-alice-1", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await alice.responses.create(model="m", input="go on", tools=tools("cntr_bob"))
