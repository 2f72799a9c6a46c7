"""An upstream's well-known client error reaches the client with the code its SDK branches on.

A prompt too long for the model (OpenAI's `context_length_exceeded`, Anthropic's "prompt is too
long") reached OpenAI clients as `upstream_client_error`: a client that trims its history on
`context_length_exceeded` never did. It is now relayed as OpenAI sends it (400,
`invalid_request_error`, `context_length_exceeded`, `param: messages`), and an Anthropic client's
message begins "prompt is too long" as Anthropic's does. A content filter's refusal keeps its code
(`content_policy_violation`, Azure's `content_filter`). A provider that calls edgeroute's key
invalid in a 400 (Gemini's "API key not valid", status 400) is the gateway's error (502), never
the client's 400 nor the provider's words. Upstream messages stay redacted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
LEAKED = "sk-proj-" + "Q" * 40  # a key the upstream quotes: never relayed
CONTEXT_MESSAGE = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted in 200000 tokens."
    f" (key {LEAKED})"
)


def _error(status: int, body: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    return handle


OPENAI_CONTEXT = {
    "error": {
        "message": CONTEXT_MESSAGE,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
ANTHROPIC_CONTEXT = {
    "type": "error",
    "error": {"type": "invalid_request_error", "message": "prompt is too long: 208000 tokens > 200000 maximum"},
}
OPENAI_POLICY = {
    "error": {
        "message": "Your request was rejected as a result of our safety system.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
}
AZURE_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
    }
}
GEMINI_BAD_KEY = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
    }
}


async def _proxy(
    start_proxy: StartProxy, serve_routes: ServeRoutes, body: dict[str, Any], kind: str = "openai", copies: int = 1
) -> Proxy:
    handle = _error(400, body)
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {"m": {"deployments": []}}}
    for i in range(copies):
        up = await serve_routes(
            web.post("/v1/chat/completions", handle),
            web.post("/v1/messages", handle),
            web.post("/v1/models/{target}", handle),
            web.post("/v1/openai/deployments/{name}/chat/completions", handle),
        )
        cfg["providers"][f"p{i}"] = {"kind": kind, "base_url": up.url + "/v1", "api_key": "sk-up-key-0123456789"}
        cfg["deployments"][f"d{i}"] = {"provider": f"p{i}", "model": "x"}
        cfg["models"]["m"]["deployments"].append(f"d{i}")
    return await start_proxy(cfg)


async def _openai_error(proxy: Proxy, stream: bool = False) -> openai.APIStatusError:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as got:
            await client.chat.completions.create(model="m", messages=HI, stream=stream)
    finally:
        await client.close()
    return got.value


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("kind", "body"), [("openai", OPENAI_CONTEXT), ("anthropic", ANTHROPIC_CONTEXT)], ids=["openai", "anthropic"]
)
async def test_an_openai_client_gets_context_length_exceeded(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, body: dict[str, Any], stream: bool
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, body, kind)
    e = await _openai_error(proxy, stream)
    assert isinstance(e, openai.BadRequestError), e
    assert (e.status_code, e.code, e.type, e.param) == (
        400,
        "context_length_exceeded",
        "invalid_request_error",
        "messages",
    )
    assert LEAKED not in e.response.text
    rec = await recorded(proxy)
    assert rec.status == 400


async def test_every_deployment_too_small_is_still_context_length_exceeded(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    """Two deployments without a `context_window` in the config both overflow: the client's 400,
    not a 502 "all deployments failed"."""
    proxy = await _proxy(start_proxy, serve_routes, OPENAI_CONTEXT, copies=2)
    e = await _openai_error(proxy)
    assert (e.status_code, e.code) == (400, "context_length_exceeded")


async def test_an_anthropic_client_is_told_its_prompt_is_too_long(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, OPENAI_CONTEXT)
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    try:
        with pytest.raises(anthropic.BadRequestError) as got:
            await claude.messages.create(model="m", max_tokens=10, messages=HI)
    finally:
        await claude.close()
    body = got.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("prompt is too long")
    assert LEAKED not in got.value.response.text


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [("openai", OPENAI_POLICY, "content_policy_violation"), ("azure", AZURE_FILTER, "content_filter")],
    ids=["openai", "azure"],
)
async def test_a_content_filter_refusal_keeps_its_code(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, body: dict[str, Any], code: str
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, body, kind)
    e = await _openai_error(proxy)
    assert (e.status_code, e.code, e.type) == (400, code, "invalid_request_error")


async def test_a_provider_refusing_our_key_in_a_400_is_the_gateways_error(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, GEMINI_BAD_KEY, "gemini")
    e = await _openai_error(proxy)
    assert e.status_code == 502, e
    assert "API key" not in e.response.text and e.code != "upstream_client_error"
    rec = await recorded(proxy)
    assert rec.attempts[0].outcome == "auth_error"
