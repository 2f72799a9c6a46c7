"""The Gemini adapter: the mock against google-genai, request mapping, golden translations, safety blocks."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from edgeroute.config import Provider
from edgeroute.providers.gemini import GeminiAdapter
from edgeroute.secrets import Secret
from tests.providers_fixtures import provider_config, start_mock
from tests.test_providers_anthropic import chunks_of

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]


def adapter(**options: Any) -> GeminiAdapter:
    p = Provider(kind="gemini", base_url="https://generativelanguage.googleapis.com/v1beta", options=options)
    return GeminiAdapter("gem", p, Secret("AIza-test", "<literal>"))


def _client(root: str, key: str = "k") -> genai.Client:
    http = types.HttpOptions(base_url=root, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=key, http_options=http)


# google-genai subclasses aiohttp's ClientSession, which aiohttp discourages with a warning.
@pytest.mark.filterwarnings("ignore:Inheritance class:DeprecationWarning")
async def test_mock_is_honest_for_google_genai(start_mock) -> None:
    up = await start_mock("gemini", api_key="k", cached_tokens=2)
    client = _client(up.root)
    cfg = types.GenerateContentConfig(system_instruction="Be brief", max_output_tokens=100)
    r = await client.aio.models.generate_content(model="gemini-x", contents="Say hello", config=cfg)
    assert r.text is not None and r.text.startswith("Hello from gemini-x.")
    assert r.candidates and r.candidates[0].finish_reason == types.FinishReason.STOP
    assert r.usage_metadata and r.usage_metadata.cached_content_token_count == 2
    decl = types.FunctionDeclaration(
        name="get_weather", parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}}
    )
    tcfg = types.GenerateContentConfig(
        tools=[types.Tool(function_declarations=[decl])],
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    r = await client.aio.models.generate_content(model="gemini-x", contents="weather?", config=tcfg)
    assert r.function_calls and r.function_calls[0].name == "get_weather"
    assert r.function_calls[0].args == {"city": "Paris"}
    text = ""
    async for chunk in await client.aio.models.generate_content_stream(model="gemini-x", contents="Say hello"):
        text += chunk.text or ""
    assert text.startswith("Hello from gemini-x.")
    block = types.GenerateContentConfig(http_options=types.HttpOptions(headers={"x-mock-safety": "prompt"}))
    r = await client.aio.models.generate_content(model="gemini-x", contents="x", config=block)
    assert r.prompt_feedback and r.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    with pytest.raises(genai_errors.ClientError) as e:
        fail = types.GenerateContentConfig(
            http_options=types.HttpOptions(
                headers={"x-mock-status": "429"}, retry_options=types.HttpRetryOptions(attempts=1)
            )
        )
        await client.aio.models.generate_content(model="gemini-x", contents="x", config=fail)
    assert (e.value.code, e.value.status) == (429, "RESOURCE_EXHAUSTED")
    with pytest.raises(genai_errors.ClientError) as e2:
        await _client(up.root, "wrong").aio.models.generate_content(model="gemini-x", contents="x")
    assert e2.value.code == 400


def test_request_mapping() -> None:
    body = {
        "model": "public",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"c":"P"}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"sky":"clear"}'},
            {"role": "tool", "tool_call_id": "c1", "content": "plain text"},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "w"}},
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.8,
        "seed": 4,
        "stop": ["END"],
        "response_format": {"type": "json_object"},
    }
    req = adapter().build("gemini-x", orjson.dumps(body), stream=True)
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    assert req.headers["x-goog-api-key"] == "AIza-test"
    assert orjson.loads(req.body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Weather?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/a.png"}},
                ],
            },
            {"role": "model", "parts": [{"text": "Checking."}, {"functionCall": {"name": "w", "args": {"c": "P"}}}]},
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "w", "response": {"sky": "clear"}}},
                    {"functionResponse": {"name": "w", "response": {"content": "plain text"}}},
                ],
            },
        ],
        "generationConfig": {
            "maxOutputTokens": 50,
            "temperature": 0.3,
            "topP": 0.8,
            "seed": 4,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
        },
        "tools": [{"functionDeclarations": [{"name": "w", "parametersJsonSchema": {"type": "object"}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["w"]}},
    }


def test_translate_response_golden() -> None:
    native = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking...", "thought": True},
                        {"text": "Here: "},
                        {"functionCall": {"name": "w", "args": {"city": "Paris"}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 100,
            "candidatesTokenCount": 10,
            "thoughtsTokenCount": 5,
            "cachedContentTokenCount": 60,
        },
        "modelVersion": "gemini-x",
        "responseId": "r1",
    }
    got = adapter().translate_response(native)
    msg = got["choices"][0]["message"]
    assert (got["id"], got["model"], got["choices"][0]["finish_reason"]) == ("r1", "gemini-x", "tool_calls")
    assert msg["content"] == "Here: "
    assert [(c["type"], c["function"]) for c in msg["tool_calls"]] == [
        ("function", {"name": "w", "arguments": '{"city":"Paris"}'})
    ]
    assert msg["tool_calls"][0]["id"].startswith("call_")
    assert got["usage"]["prompt_tokens"] == 100 and got["usage"]["completion_tokens"] == 15
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 60
    assert got["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter")],
)
def test_finish_reasons(reason: str, finish: str) -> None:
    native = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]}
    assert adapter().translate_response(native)["choices"][0]["finish_reason"] == finish


def test_blocked_prompt_is_content_filter() -> None:
    native = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}}
    got = adapter().translate_response(native)
    assert got["choices"][0]["finish_reason"] == "content_filter" and got["choices"][0]["message"]["content"] == ""


def _sse(*objs: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(o) + b"\r\n\r\n" for o in objs)


STREAM = _sse(
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}], "modelVersion": "gemini-x"},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "lo"}]}}]},
    {
        "candidates": [
            {
                "content": {
                    "parts": [{"functionCall": {"name": "a", "args": {"x": 1}}}, {"functionCall": {"name": "b"}}]
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3},
    },
)


@pytest.mark.parametrize("size", [1, 13, len(STREAM)])
def test_stream_translation_golden(size: int) -> None:
    t = adapter().stream_translator("public", include_usage=True)
    out = b"".join(t.feed(STREAM[i : i + size]) for i in range(0, len(STREAM), size))
    chunks = chunks_of(out)
    assert chunks[-1] == {"done": True}
    deltas = [c["choices"][0]["delta"] for c in chunks[:-2]]
    assert deltas[:3] == [{"role": "assistant", "content": "", "refusal": None}, {"content": "Hel"}, {"content": "lo"}]
    calls = [d["tool_calls"][0] for d in deltas[3:5]]
    assert [(c["index"], c["function"]) for c in calls] == [
        (0, {"name": "a", "arguments": '{"x":1}'}),
        (1, {"name": "b", "arguments": "{}"}),
    ]
    assert chunks[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-2]["usage"]["prompt_tokens"] == 7 and chunks[-2]["model"] == "gemini-x"


@pytest.mark.parametrize("where", ["prompt", "answer"])
@pytest.mark.parametrize("stream", [False, True])
async def test_safety_blocks_are_content_filter(start_mock, start_proxy, where: str, stream: bool) -> None:
    up = await start_mock("gemini")
    cfg = provider_config({"g": up})
    cfg["providers"]["g"]["headers"] = {"x-mock-safety": where}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    if stream:
        chunks = [c async for c in await client.chat.completions.create(model="m", messages=HELLO, stream=True)]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["content_filter"]
    else:
        r = await client.chat.completions.create(model="m", messages=HELLO)
        assert r.choices[0].finish_reason == "content_filter" and not r.choices[0].message.content


async def test_json_mode_is_native(start_mock, start_proxy) -> None:
    up = await start_mock("gemini", record=True)
    proxy = await start_proxy(provider_config({"g": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    r = await client.chat.completions.create(model="m", messages=HELLO, response_format=fmt)
    assert orjson.loads(r.choices[0].message.content) == {"city": "Paris"}
    gen = up.options.requests[-1]["body"]["generationConfig"]
    assert gen == {"responseMimeType": "application/json", "responseJsonSchema": schema}


async def test_n_above_one_is_rejected(start_mock, start_proxy) -> None:
    up = await start_mock("gemini")
    proxy = await start_proxy(provider_config({"g": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=HELLO, n=2)
    assert e.value.param == "n"
