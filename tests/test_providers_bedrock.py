"""The Bedrock adapter: the mock against boto3, SigV4 signing, event-stream decoding, request mapping."""

from __future__ import annotations

import asyncio
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import openai
import orjson
import pytest

from edgeroute.config import Provider
from edgeroute.errors import ProxyError
from edgeroute.mock.bedrock import encode_frame, event_frame, exception_frame
from edgeroute.providers.bedrock import BedrockAdapter
from tests.providers_fixtures import BEDROCK_OPTIONS, provider_config, start_mock
from tests.test_providers_anthropic import chunks_of

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]
MODEL_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"


def adapter(**options: Any) -> BedrockAdapter:
    p = Provider(
        kind="bedrock",
        base_url="https://bedrock-runtime.eu-west-3.amazonaws.com",
        options={"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "s", **options},
    )
    return BedrockAdapter("br", p, None)


def _boto(root: str, secret: str = "dummy-secret", headers: dict[str, str] | None = None) -> Any:
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=root,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )

    def add_headers(request: Any, **_: Any) -> None:  # the mock's x-mock-* switches (boto3 has no per-call headers)
        for k, v in (headers or {}).items():
            request.headers[k] = v

    client.meta.events.register_first("before-sign.bedrock-runtime.*", add_headers)
    return client


async def test_mock_is_honest_for_boto3(start_mock) -> None:
    up = await start_mock("bedrock", cached_tokens=2)

    def calls() -> None:
        client = _boto(up.root)
        r = client.converse(
            modelId=MODEL_ID,
            system=[{"text": "Be brief"}],
            messages=[
                {
                    "role": "user",
                    "content": [{"text": "Say hello"}, {"image": {"format": "png", "source": {"bytes": b"\x89PNG"}}}],
                }
            ],
            inferenceConfig={"maxTokens": 100},
        )
        assert r["output"]["message"]["content"][0]["text"].startswith(f"Hello from {MODEL_ID}.")
        assert r["stopReason"] == "end_turn" and r["usage"]["cacheReadInputTokens"] == 2
        tool = {
            "toolSpec": {
                "name": "w",
                "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}},
            }
        }
        s = client.converse_stream(
            modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}], toolConfig={"tools": [tool]}
        )
        events = list(s["stream"])
        assert [next(iter(e)) for e in events] == [
            "messageStart",
            "contentBlockStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata",
        ]
        args = "".join(e["contentBlockDelta"]["delta"]["toolUse"]["input"] for e in events if "contentBlockDelta" in e)
        assert orjson.loads(args) == {"city": "Paris"}
        assert events[-1]["metadata"]["usage"]["outputTokens"] == 12
        throttled = _boto(up.root, headers={"x-mock-status": "429"})
        with pytest.raises(throttled.exceptions.ThrottlingException):
            throttled.converse(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}])
        with pytest.raises(botocore.exceptions.ClientError) as e:
            _boto(up.root, "wrong").converse(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}])
        assert e.value.response["Error"]["Code"] == "InvalidSignatureException"
        failing = _boto(up.root, headers={"x-mock-stream-error": "1"})
        s = failing.converse_stream(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "x"}]}])
        with pytest.raises(botocore.exceptions.EventStreamError) as es:
            list(s["stream"])
        assert es.value.response["Error"]["Code"] == "throttlingException"

    await asyncio.to_thread(calls)


def test_request_mapping_and_signature() -> None:
    body = {
        "model": "public",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"c":1}'}}],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "Sunny"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "w", "description": "W", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "auto",
        "max_completion_tokens": 64,
        "temperature": 0.1,
        "top_p": 0.9,
        "stop": "END",
    }
    req = adapter().build(MODEL_ID, orjson.dumps(body), stream=True)
    assert req.url == (
        "https://bedrock-runtime.eu-west-3.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse-stream"
    )
    auth = req.headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/") and "/eu-west-3/bedrock/aws4_request" in auth
    assert "X-Amz-Date" in req.headers
    assert orjson.loads(req.body) == {
        "messages": [
            {"role": "user", "content": [{"image": {"format": "jpeg", "source": {"bytes": "/9j/"}}}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "w", "input": {"c": 1}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "Sunny"}]}}]},
        ],
        "system": [{"text": "Be brief."}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.1, "topP": 0.9, "stopSequences": ["END"]},
        "toolConfig": {
            "tools": [{"toolSpec": {"name": "w", "description": "W", "inputSchema": {"json": {"type": "object"}}}}],
            "toolChoice": {"auto": {}},
        },
    }


def test_image_urls_are_rejected_because_bedrock_cannot_fetch_them() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
    }
    with pytest.raises(ProxyError) as e:
        adapter().build(MODEL_ID, orjson.dumps(body), stream=False)
    assert e.value.status == 400


def test_api_key_auth_mode() -> None:
    p = Provider(
        kind="bedrock", base_url="https://bedrock-runtime.us-east-1.amazonaws.com", options={"auth": "api_key"}
    )
    from edgeroute.secrets import Secret

    req = BedrockAdapter("br", p, Secret("bedrock-key", "<literal>")).build(
        MODEL_ID, orjson.dumps({"model": "m", "messages": HELLO}), False
    )
    assert req.headers["Authorization"] == "Bearer bedrock-key"


STREAM = b"".join(
    [
        event_frame("messageStart", {"role": "assistant"}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi é"}}),
        event_frame("contentBlockStop", {"contentBlockIndex": 0}),
        event_frame(
            "contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tu1", "name": "w"}}}
        ),
        event_frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"a":'}}}),
        event_frame("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "[1,2]}"}}}),
        event_frame("contentBlockStop", {"contentBlockIndex": 1}),
        event_frame("messageStop", {"stopReason": "tool_use"}),
        event_frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 9, "cacheReadInputTokens": 20}}),
    ]
)


@pytest.mark.parametrize("size", [1, 5, 100, len(STREAM)])
def test_event_stream_translation_golden(size: int) -> None:
    t = adapter().stream_translator("public", include_usage=True)
    out = b"".join(t.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    chunks = chunks_of(out)
    assert chunks[-1] == {"done": True}
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-2]]
    assert deltas == [
        ({"role": "assistant", "content": "", "refusal": None}, None),
        ({"content": "Hi é"}, None),
        (
            {"tool_calls": [{"index": 0, "id": "tu1", "type": "function", "function": {"name": "w", "arguments": ""}}]},
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": "[1,2]}"}}]}, None),
        ({}, "tool_calls"),
    ]
    u = chunks[-2]["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"]) == (25, 9, 20)


def test_exception_frames_and_corrupt_frames_become_error_events() -> None:
    t = adapter().stream_translator("public")
    chunks = chunks_of(t.feed(exception_frame("modelStreamErrorException", "boom")))
    # of the class its status stands for (a model's failure: the server's), with Bedrock's own name as its code
    assert chunks == [
        {"error": {"message": "boom", "type": "api_error", "param": None, "code": "modelStreamErrorException"}}
    ]
    frame = bytearray(encode_frame({":message-type": "event", ":event-type": "messageStart"}, b"{}"))
    frame[-1] ^= 0xFF  # break the message CRC
    t2 = adapter().stream_translator("public")
    assert chunks_of(t2.feed(bytes(frame)))[0]["error"]["message"] == "upstream sent a malformed event-stream frame"


async def test_wrong_credentials_are_a_deployment_failure_that_names_no_secret(start_mock, start_proxy) -> None:
    # The provider's 403 is about edgeroute's credentials, not the client's: a 502 that says so.
    up = await start_mock("bedrock")
    proxy = await start_proxy(
        provider_config({"b": up}, options={"b": {**BEDROCK_OPTIONS, "aws_secret_access_key": "not-the-secret"}})
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert e.value.status_code == 502
    assert "refused edgeroute's credentials" in str(e.value.body) and "not-the-secret" not in str(e.value.body)


async def test_stream_exception_before_content_fails_over(start_mock, start_proxy) -> None:
    bad = await start_mock("bedrock")
    good = await start_mock("bedrock")
    cfg = provider_config({"bad": bad, "good": good}, models={"bad": MODEL_ID, "good": MODEL_ID})
    cfg["providers"]["bad"]["headers"] = {"x-mock-stream-error": "1"}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO, stream=True)
    assert raw.headers["x-edgeroute-deployment"] == "d-good"
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text.startswith(f"Hello from {MODEL_ID}.")


async def test_json_mode_uses_a_forced_tool(start_mock, start_proxy) -> None:
    up = await start_mock("bedrock", record=True)
    proxy = await start_proxy(provider_config({"b": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    r = await client.chat.completions.create(model="m", messages=HELLO, response_format=fmt)
    assert orjson.loads(r.choices[0].message.content) == {"city": "Paris"} and r.choices[0].finish_reason == "stop"
    chunks = [
        c
        async for c in await client.chat.completions.create(model="m", messages=HELLO, response_format=fmt, stream=True)
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert orjson.loads(text) == {"city": "Paris"}
    assert up.options.requests[-1]["body"]["toolConfig"]["toolChoice"] == {"tool": {"name": "edgeroute_json_response"}}
