"""`POST /v1/messages`: Anthropic SDK clients served by any provider through edgeroute.

Golden comparisons: the answer an Anthropic client gets through edgeroute from an
OpenAI deployment equals, field by field (ids aside), the answer the Anthropic mock
gives directly for the same request.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _fields(msg: Any) -> dict[str, Any]:
    d = msg.model_dump()
    u = d["usage"]
    return {
        "type": d["type"],
        "role": d["role"],
        "model": d["model"],
        "content": [{k: v for k, v in b.items() if k != "id" and v is not None} for b in d["content"]],
        "stop_reason": d["stop_reason"],
        "stop_sequence": d["stop_sequence"],
        "usage": (u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"] or 0),
    }


async def _clients(start_mock: Any, start_proxy: Any, kind: str = "openai", **mock: Any) -> tuple[Any, Any, Any]:
    native = await start_mock("anthropic")
    up = await start_mock(kind, record=True, **mock)
    proxy = await start_proxy(provider_config({"p": up}))
    direct = anthropic.AsyncAnthropic(base_url=native.root, api_key="x", max_retries=0)
    via = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    return direct, via, up


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "bedrock"])
async def test_message_equals_native_anthropic_answer(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)
    want = await direct.messages.create(model="gpt-4o-mini", max_tokens=100, messages=HELLO)
    got = await via.messages.create(model="m", max_tokens=100, messages=HELLO)
    g, w = _fields(got), _fields(want)
    if kind == "bedrock":
        assert g.pop("model") == "m"
        w.pop("model")
    assert g == w
    assert got.id.startswith("msg_")


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "bedrock"])
async def test_stream_equals_native_anthropic_stream(start_mock, start_proxy, kind: str) -> None:
    direct, via, _ = await _clients(start_mock, start_proxy, kind)

    async def run(client: Any, model: str) -> tuple[list[str], Any, str]:
        kinds = []
        text = ""
        async with client.messages.stream(model=model, max_tokens=100, messages=HELLO) as s:
            async for ev in s:
                if ev.type.startswith(("message_", "content_block_")):
                    kinds.append(ev.type if ev.type != "content_block_delta" else ev.delta.type)
                if ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                    text += ev.delta.text
            final = await s.get_final_message()
        return kinds, final, text

    want_kinds, want, want_text = await run(direct, "gpt-4o-mini")
    got_kinds, got, got_text = await run(via, "m")
    assert got_kinds == want_kinds
    assert got_kinds[0] == "message_start" and got_kinds[-2:] == ["message_delta", "message_stop"]
    assert got_text == want_text
    g, w = _fields(got), _fields(want)
    if kind == "bedrock":
        assert g.pop("model") == "m"
        w.pop("model")
    assert g == w


async def test_tool_use_round_trip(start_mock, start_proxy) -> None:
    direct, via, up = await _clients(start_mock, start_proxy)
    want = await direct.messages.create(model="gpt-4o-mini", max_tokens=100, tools=TOOLS, messages=ASK)
    got = await via.messages.create(model="m", max_tokens=100, tools=TOOLS, messages=ASK)
    assert _fields(got)["content"] == _fields(want)["content"]
    assert got.stop_reason == "tool_use"
    (use,) = got.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris", "days": 1}
    turn2 = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in got.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},
    ]
    final = await via.messages.create(model="m", max_tokens=100, tools=TOOLS, messages=turn2)
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    # The OpenAI upstream saw an assistant tool call and the tool's answer, tied by id.
    seen = up.options.requests[-1]["body"]["messages"]
    assert seen[1]["tool_calls"][0]["id"] == use.id
    assert seen[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris","days":1}'}
    assert seen[2] == {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 21 C"}


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "bedrock"])
async def test_streamed_tool_use_input_json_deltas_are_exact(start_mock, start_proxy, kind: str) -> None:
    _, via, _ = await _clients(start_mock, start_proxy, kind)
    partial = ""
    async with via.messages.stream(model="m", max_tokens=100, tools=TOOLS, messages=ASK) as s:
        async for ev in s:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial += ev.delta.partial_json
        final = await s.get_final_message()
    assert partial == '{"city":"Paris","days":1}'
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "tool_use" and final.content[0].input == {"city": "Paris", "days": 1}
    assert final.usage.output_tokens == 12


async def test_system_prompt_images_and_parameters_reach_the_upstream(start_mock, start_proxy) -> None:
    _, via, up = await _clients(start_mock, start_proxy)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    await via.messages.create(
        model="m",
        max_tokens=50,
        system=[{"type": "text", "text": "Be brief."}],
        stop_sequences=["END"],
        extra_body={"temperature": 0.5, "top_p": 0.9},  # top_k: see test_anthropic_passthrough
        metadata={"user_id": "u-1"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    body = up.options.requests[-1]["body"]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["stop"], body["user"]) == (
        50,
        0.5,
        0.9,
        ["END"],
        "u-1",
    )
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False


async def test_failover_is_transparent_to_an_anthropic_client(start_mock, start_proxy) -> None:
    down = await start_mock("openai", fail_status=503)
    anth = await start_mock("anthropic")
    proxy = await start_proxy(provider_config({"o": down, "a": anth}))
    via = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    got = await via.messages.create(model="m", max_tokens=100, messages=HELLO)
    assert got.content[0].text.startswith("Hello from gpt-4o-mini.")
    async with via.messages.stream(model="m", max_tokens=100, messages=HELLO) as s:
        final = await s.get_final_message()
    assert final.content[0].text == got.content[0].text


@pytest.mark.parametrize(
    ("status", "exc", "etype"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
    ],
)
async def test_upstream_failures_are_anthropic_errors(
    start_mock, start_proxy, status: int, exc: Any, etype: str
) -> None:
    up = await start_mock("openai", fail_status=status)
    proxy = await start_proxy(provider_config({"p": up}))
    via = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(exc) as e:
        await via.messages.create(model="m", max_tokens=100, messages=HELLO)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == etype


async def test_request_errors_are_anthropic_errors(start_mock, start_proxy) -> None:
    up = await start_mock("openai")
    cfg = provider_config({"p": up})
    cfg["server"] = {"api_keys": ["client-key"]}
    proxy = await start_proxy(cfg)
    good = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="client-key", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as nf:
        await good.messages.create(model="nope", max_tokens=10, messages=HELLO)
    assert nf.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": nf.value.body["error"]["message"]},
    }
    bad = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="wrong-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as au:
        await bad.messages.create(model="m", max_tokens=10, messages=HELLO)
    assert au.value.body["error"]["type"] == "authentication_error"
    assert "wrong-key" not in str(au.value.body)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/v1/messages",
            json={"model": "m", "messages": HELLO},
            headers={"x-api-key": "client-key", "anthropic-version": "2023-06-01"},
        ) as r,
    ):
        assert r.status == 400
        assert await r.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
        }
    # A document whose source is of no shape Anthropic takes: named, before any call.
    doc = {"type": "document", "source": {"type": "pdf", "data": "x"}}
    with pytest.raises(anthropic.BadRequestError) as br:
        await good.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": [doc]}])
    assert br.value.body["error"]["message"].startswith("messages.0.content.0.source: a document's source is")


async def test_structured_output_becomes_response_format(start_mock, start_proxy) -> None:
    _, via, up = await _clients(start_mock, start_proxy)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    await via.messages.create(
        model="m", max_tokens=50, messages=HELLO, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    body = up.options.requests[-1]["body"]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


async def test_count_tokens(start_mock, start_proxy) -> None:
    _, via, _ = await _clients(start_mock, start_proxy)
    short = await via.messages.count_tokens(model="m", messages=HELLO)
    long = await via.messages.count_tokens(
        model="m", system="Be brief.", messages=[{"role": "user", "content": "a b c " * 50}]
    )
    assert 0 < short.input_tokens < long.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        await via.messages.count_tokens(model="nope", messages=HELLO)


def _png(w: int, h: int) -> str:
    """A real PNG of w x h pixels (one gray row repeated), base64."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + b"\x80" * w) * h
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


async def test_count_tokens_counts_images_by_anthropics_rule(start_mock, start_proxy) -> None:
    """An image is width x height / 750 tokens (at most 1,600) beside the text, as Anthropic's
    own count_tokens says; an image by URL (its size unknown here) at the most."""
    _, via, _ = await _clients(start_mock, start_proxy)
    text = {"type": "text", "text": "What is in this picture?"}

    async def count(*images: dict[str, Any]) -> int:
        got = await via.messages.count_tokens(model="m", messages=[{"role": "user", "content": [*images, text]}])
        return int(got.input_tokens)

    def b64(w: int, h: int) -> dict[str, Any]:
        return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png(w, h)}}

    alone = await count()
    assert await count(b64(300, 200)) == alone + 80
    assert await count(b64(300, 200), b64(1000, 1000)) == alone + 80 + 1334
    assert await count(b64(4000, 3000)) == alone + 1600
    assert await count({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}) == alone + 1600
