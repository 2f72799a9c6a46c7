"""A provider's response headers never reach the client: edgeroute builds every answer's
headers itself (its own `x-request-id`, `x-edgeroute-*`, a `Retry-After` it computed), so a
provider's organization, project, request ids, rate-limit counters, cookies and edge headers
do not tell a client which account or provider served it, nor set cookies in its browser.

An allow-list by construction: the relay copies no upstream header. This test holds it on
every way an answer goes out (JSON, streams, pass-through and translated, errors), with the
official SDKs as clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.security.conftest import Served

# What OpenAI, Anthropic and the CDNs in front of them send, with values a client could
# recognise; `x-request-id` and `server` are names edgeroute also sends (its own values).
PROVIDER_HEADERS = {
    "openai-organization": "org-acme-secret-team",
    "openai-project": "proj_provider123",
    "openai-processing-ms": "4321",
    "openai-version": "2020-10-01",
    "x-request-id": "prov-req-0123456789",
    "request-id": "req_anthropic_0123456789",
    "anthropic-organization-id": "0b1c2d3e-provider-org",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-remaining-tokens": "149984",
    "anthropic-ratelimit-requests-remaining": "3999",
    "set-cookie": "__cf_bm=provider-cookie; path=/; domain=.api.example.com; HttpOnly; Secure",
    "cf-ray": "8f00provider-SJC",
    "server": "cloudflare-provider",
    "via": "1.1 provider-gateway",
    "x-envoy-upstream-service-time": "4300",
    "alt-svc": 'h3=":443"; ma=86400',
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "x-provider-debug": "shard=eu-7",
}
USER: Any = [{"role": "user", "content": "hello"}]


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + orjson.dumps(obj) + b"\n\n"


async def _answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    headers = dict(PROVIDER_HEADERS)
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    if body.get("input") == "bad" or any(m.get("content") == "bad" for m in body.get("messages", [])):
        err = {"error": {"message": "bad request", "type": "invalid_request_error", "code": None}}
        return web.json_response(err, status=400, headers=headers)
    if request.path.endswith("/embeddings"):
        data = [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]
        out = {"object": "list", "data": data, "model": "x", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        return web.json_response(out, headers=headers)
    if request.path.endswith("/messages"):  # an Anthropic upstream
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "x",
                   "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
        if not body.get("stream"):
            return web.json_response(message, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = {**message, "content": [], "stop_reason": None}
        await resp.write(
            _sse({"type": "message_start", "message": start}, "message_start")
            + _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                   "content_block_start")
            + _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
                   "content_block_delta")
            + _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 1}}, "message_delta")
            + _sse({"type": "message_stop"}, "message_stop")
        )  # fmt: skip
        return resp
    if not body.get("stream"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        out = {"id": "c1", "object": "chat.completion", "created": 0, "model": "x", "usage": usage, "choices": [choice]}
        return web.json_response(out, headers=headers)
    resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
    await resp.prepare(request)
    delta = {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x", "choices": [delta]}
    await resp.write(_sse(chunk) + _sse({**chunk, "choices": [], "usage": usage}) + b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def provider() -> AsyncIterator[str]:
    paths = ("/v1/chat/completions", "/v1/embeddings", "/v1/messages")
    async with routes_upstream(*(web.post(path, _answer) for path in paths)) as server:
        yield server.url


def _config(url: str) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    return {
        "providers": {
            "oa": {"base_url": url + "/v1", "api_key": "k-openai-0123456789"},
            "an": {"kind": "anthropic", "base_url": url, "api_key": "k-anthropic-0123456789"},
        },
        "deployments": {
            "d-oa": {"provider": "oa", "model": "x", "price": price},
            "d-an": {"provider": "an", "model": "x", "price": price},
        },
        "models": {"m": {"deployments": ["d-oa"], "max_attempts": 1}, "a": {"deployments": ["d-an"]}},
    }


def _leaked(headers: Any) -> dict[str, str]:
    """The provider's headers the client got (a name edgeroute also sends counts with the provider's value only)."""
    ours = ("x-request-id", "server")
    got = {k: headers.get(k) for k in PROVIDER_HEADERS if headers.get(k) is not None}
    return {k: v for k, v in got.items() if k not in ours or PROVIDER_HEADERS[k] in v}


async def test_no_provider_header_reaches_an_openai_sdk_client(provider: str, serve: Any) -> None:
    proxy: Served = await serve(_config(provider))
    seen: dict[str, Any] = {}
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        chat = client.chat.completions.with_raw_response
        raw = await chat.create(model="m", messages=USER)
        seen["chat"] = raw.headers
        assert raw.parse().choices[0].message.content == "hi"
        async with client.chat.completions.with_streaming_response.create(model="m", messages=USER, stream=True) as s:
            seen["chat stream"] = s.headers
            assert "hi" in "".join([line async for line in s.iter_lines()])
        raw_e = await client.embeddings.with_raw_response.create(model="m", input="hi", encoding_format="float")
        seen["embeddings"] = raw_e.headers
        assert raw_e.parse().data[0].embedding == [0.5, 0.25]
        raw = await chat.create(model="a", messages=USER)  # an Anthropic upstream, translated
        seen["chat from anthropic"] = raw.headers
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "bad"}])
        seen["error"] = e.value.response.headers
    for path, headers in seen.items():
        assert _leaked(headers) == {}, path
        assert (
            headers["x-request-id"].startswith("req_") and headers["x-request-id"] != PROVIDER_HEADERS["x-request-id"]
        )


@pytest.mark.parametrize("stream", [False, True])
async def test_no_provider_header_reaches_an_anthropic_sdk_client(provider: str, serve: Any, stream: bool) -> None:
    proxy: Served = await serve(_config(provider))
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0) as client:
        for model in ("a", "m"):  # passed through to an Anthropic upstream; translated from chat
            if stream:
                async with client.messages.with_streaming_response.create(
                    model=model, max_tokens=10, messages=USER, stream=True
                ) as s:
                    headers = s.headers
                    assert "hi" in "".join([line async for line in s.iter_lines()])
            else:
                raw = await client.messages.with_raw_response.create(model=model, max_tokens=10, messages=USER)
                headers = raw.headers
                assert (await raw.parse()).content[0].text == "hi"  # type: ignore[union-attr]
            assert _leaked(headers) == {}, model
