"""The Anthropic adapter: request mapping, golden translations, stream deltas, JSON mode, parameter rules."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import orjson
import pytest

from edgeroute import sse
from edgeroute.config import Provider
from edgeroute.providers.anthropic import AnthropicAdapter
from edgeroute.secrets import Secret
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]


def adapter(**options: Any) -> AnthropicAdapter:
    p = Provider(kind="anthropic", base_url="https://api.anthropic.com", options=options)
    return AnthropicAdapter("anth", p, Secret("sk-ant-test", "<literal>"))


def chunks_of(data: bytes) -> list[dict[str, Any]]:
    events, rest = sse.split_events(data)
    assert rest == b""
    out = []
    for ev in events:
        payload = sse.event_data(ev)
        assert payload is not None
        out.append({"done": True} if payload == b"[DONE]" else orjson.loads(payload))
    return out


# -- the mock, kept honest by the official SDK --------------------------------


async def test_mock_is_honest_for_the_anthropic_sdk(start_mock) -> None:
    up = await start_mock("anthropic", api_key="k", cached_tokens=2)
    client = anthropic.AsyncAnthropic(base_url=up.root, api_key="k", max_retries=0)
    msg = await client.messages.create(
        model="claude-x", max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text.startswith("Hello from claude-x.")
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.cache_read_input_tokens, msg.usage.input_tokens) == (2, 13)
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    async with client.messages.stream(
        model="claude-x", max_tokens=100, tools=tools, messages=[{"role": "user", "content": "weather?"}]
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "Paris"}
    with pytest.raises(anthropic.APIStatusError) as e:
        await client.messages.create(
            model="claude-x", max_tokens=10, messages=HELLO, extra_headers={"x-mock-status": "529"}
        )
    assert e.value.status_code == 529 and e.value.body["error"]["type"] == "overloaded_error"
    bad = anthropic.AsyncAnthropic(base_url=up.root, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(model="claude-x", max_tokens=10, messages=HELLO)
    await client.close()


# -- request mapping ------------------------------------------------------------


def test_request_mapping() -> None:
    body = {
        "model": "public",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "loc", "arguments": "{}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "w", "arguments": '{"c":"P"}'}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Paris"},
            {"role": "tool", "tool_call_id": "call_2", "content": "Sunny"},
            {"role": "user", "content": "Thanks"},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "description": "Weather", "parameters": {}}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "top_p": 0.5,
        "stop": "END",
        "user": "u-1",
        "n": 1,
        "stream_options": {"include_usage": True},
    }
    req = adapter(version="2023-06-01").build("claude-x", orjson.dumps(body), stream=True)
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant-test" and req.headers["anthropic-version"] == "2023-06-01"
    assert orjson.loads(req.body) == {
        "model": "claude-x",
        "max_tokens": 4096,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use metric units."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "loc", "input": {}},
                    {"type": "tool_use", "id": "call_2", "name": "w", "input": {"c": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "Paris"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "Sunny"},
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "temperature": 0.2,
        "top_p": 0.5,
        "stop_sequences": ["END"],
        "tools": [{"name": "w", "description": "Weather", "input_schema": {"type": "object", "properties": {}}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": 7}, "seed"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"temperature": 1.5}, "temperature"),
    ],
)
def test_unsupported_parameters_are_rejected_or_dropped(extra: dict[str, Any], param: str) -> None:
    from edgeroute.errors import ProxyError

    body = orjson.dumps({"model": "m", "messages": HELLO, **extra})
    with pytest.raises(ProxyError) as e:
        adapter().build("claude-x", body, stream=False)
    assert e.value.status == 400 and e.value.param == param and e.value.code == "unsupported_parameter"
    sent = orjson.loads(adapter(unsupported_params="drop").build("claude-x", body, stream=False).body)
    assert param not in sent and sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]}
    ]


async def test_rejection_is_an_openai_400_before_any_upstream_call(start_mock, start_proxy) -> None:
    up = await start_mock("anthropic", record=True)
    proxy = await start_proxy(provider_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=HELLO, seed=3)
    assert e.value.code == "unsupported_parameter" and e.value.param == "seed"
    assert up.options.requests == []
    proxy2 = await start_proxy(provider_config({"a": up}, options={"a": {"unsupported_params": "drop"}}))
    client2 = openai.AsyncOpenAI(base_url=proxy2.url + "/v1", api_key="x", max_retries=0)
    r = await client2.chat.completions.create(model="m", messages=HELLO, seed=3)
    assert r.choices[0].finish_reason == "stop" and "seed" not in up.options.requests[-1]["body"]


# -- answers: golden translations -----------------------------------------------


def test_translate_response_golden() -> None:
    native = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris", "n": [1, 2]}},
            {"type": "tool_use", "id": "toolu_2", "name": "t", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 100,
            "output_tokens": 20,
        },
    }
    got = adapter().translate_response(native)
    got.pop("created")
    assert got == {
        "id": "msg_01",
        "object": "chat.completion",
        "model": "claude-x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "w", "arguments": '{"city":"Paris","n":[1,2]}'},
                        },
                        {"id": "toolu_2", "type": "function", "function": {"name": "t", "arguments": "{}"}},
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 115,
            "completion_tokens": 20,
            "total_tokens": 135,
            "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 0, "cache_write_tokens": 5},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    }


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("refusal", "content_filter")],
)
def test_finish_reasons(stop: str, finish: str) -> None:
    native = {"id": "m", "content": [{"type": "text", "text": "x"}], "stop_reason": stop, "usage": {}}
    assert adapter().translate_response(native)["choices"][0]["finish_reason"] == finish


def _anthropic_events(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\r\ndata: " + orjson.dumps(e) + b"\r\n\r\n" for e in events
    )


STREAM = _anthropic_events(
    {
        "type": "message_start",
        "message": {
            "id": "msg_s",
            "model": "claude-x",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 30, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking é"}},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_a", "name": "w"}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"ci'}},
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": 'ty":"P"}'}},
    {"type": "content_block_stop", "index": 2},
    {"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "t"}},
    {"type": "content_block_stop", "index": 3},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 25}},
    {"type": "message_stop"},
)


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_stream_translation_golden(size: int) -> None:
    t = adapter().stream_translator("public", include_usage=True)
    out = b"".join(t.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    chunks = chunks_of(out)
    assert chunks[-1] == {"done": True}
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-2]]
    assert deltas == [
        ({"role": "assistant", "content": "", "refusal": None}, None),
        ({"content": "Checking é"}, None),
        (
            {
                "tool_calls": [
                    {"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "w", "arguments": ""}}
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"P"}'}}]}, None),
        (
            {
                "tool_calls": [
                    {"index": 1, "id": "toolu_b", "type": "function", "function": {"name": "t", "arguments": ""}}
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}, None),
        ({}, "tool_calls"),
    ]
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["id"] == "msg_s" and usage["model"] == "claude-x"
    assert usage["usage"]["prompt_tokens"] == 40 and usage["usage"]["completion_tokens"] == 25
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] == 30
    assert t.usage == usage["usage"]


def test_stream_error_event_becomes_an_openai_error_event() -> None:
    t = adapter().stream_translator("public")
    data = _anthropic_events(
        {"type": "message_start", "message": {"id": "msg_e", "usage": {}}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    chunks = chunks_of(t.feed(data))
    assert chunks[-1] == {"error": {"message": "Overloaded", "type": "overloaded_error", "param": None, "code": None}}


# -- through the proxy ------------------------------------------------------------


async def test_stream_error_before_content_fails_over(start_mock, start_proxy) -> None:
    bad = await start_mock("anthropic")
    good = await start_mock("anthropic")
    cfg = provider_config({"bad": bad, "good": good})
    cfg["providers"]["bad"]["headers"] = {"x-mock-stream-error": "1"}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO, stream=True)
    assert raw.headers["x-edgeroute-deployment"] == "d-good"
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text.startswith("Hello from gpt-4o-mini.")


async def test_cached_tokens_are_prompt_tokens_and_priced_as_cached(start_mock, start_proxy) -> None:
    up = await start_mock("anthropic", cached_tokens=4)
    proxy = await start_proxy(provider_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=HELLO)
    assert r.usage.prompt_tokens == 9 and r.usage.prompt_tokens_details.cached_tokens == 4
    rec = proxy.recorder.records[-1]
    # 5 fresh at $1, 4 cached at $0.5, 13 out at $2 (per million).
    assert rec.cost_usd == pytest.approx((5 * 1.0 + 4 * 0.5 + 13 * 2.0) / 1e6)


@pytest.mark.parametrize("stream", [False, True])
async def test_json_mode_uses_a_forced_tool_and_answers_text(start_mock, start_proxy, stream: bool) -> None:
    up = await start_mock("anthropic", record=True)
    proxy = await start_proxy(provider_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    if stream:
        s = await client.chat.completions.create(model="m", messages=HELLO, response_format=fmt, stream=True)
        chunks = [c async for c in s]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    else:
        r = await client.chat.completions.create(model="m", messages=HELLO, response_format=fmt)
        text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert r.choices[0].message.tool_calls is None
    assert orjson.loads(text) == {"city": "Paris"} and finish == ["stop"]
    sent = up.options.requests[-1]["body"]
    assert sent["tool_choice"] == {"type": "tool", "name": "edgeroute_json_response"}
    assert sent["tools"][0]["input_schema"] == schema


def test_cache_control_breakpoints_are_kept() -> None:
    part = {"type": "text", "text": "long context", "cache_control": {"type": "ephemeral"}}
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    sent = orjson.loads(adapter().build("claude-x", body, stream=False).body)
    assert sent["messages"][0]["content"] == [part]
