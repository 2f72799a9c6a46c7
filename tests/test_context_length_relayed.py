"""A prompt too long for an OpenAI-compatible upstream reaches an OpenAI client as OpenAI's 400
`context_length_exceeded` (`invalid_request_error`), whatever words its server put it in, and on
`/v1/completions` too: SDK users catch that code to trim their history. Servers behind an
OpenAI-format API that say it their own way (llama.cpp's `exceed_context_size_error`, an
Anthropic model behind an OpenAI-compatible gateway: "prompt is too long", Azure's code) were
relayed as `upstream_client_error`. Upstream messages stay redacted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded
from tests.test_upstream_error_codes import LEAKED, OPENAI_CONTEXT, _error

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]

LLAMA_CPP = {
    "error": {
        "code": 400,
        "message": f"the request exceeds the available context size, try increasing it (key {LEAKED})",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 5000,
        "n_ctx": 4096,
    }
}
ANTHROPIC_BEHIND_A_GATEWAY = {
    "error": {
        "message": f"prompt is too long: 208000 tokens > 200000 maximum (key {LEAKED})",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
}
AZURE_CONTEXT = {
    "error": {
        "message": f"This model's maximum context length is 8192 tokens. (key {LEAKED})",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
        "status": 400,
    }
}

# TGI's validation errors: a 422 whose `error` is a string (`error_type: validation`).
TGI_SUM = {
    "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
    f"Given: 4000 `inputs` tokens and 200 `max_new_tokens` (key {LEAKED})",
    "error_type": "validation",
}
TGI_INPUTS = {
    "error": f"Input validation error: `inputs` must have less than 4096 tokens. Given: 4545 (key {LEAKED})",
    "error_type": "validation",
}
# Mistral's API: a flat error object, without OpenAI's code (its own numeric one in newer answers).
MISTRAL = {
    "object": "error",
    "message": "Prompt contains 40960 tokens and 0 draft tokens, too large for model with 32768 maximum context"
    f" length (key {LEAKED})",
    "type": "invalid_request_message_error",
    "param": None,
    "code": None,
}
MISTRAL_CODED = {
    "object": "error",
    "message": "Prompt contains 159202 tokens and 0 draft tokens, too large for model with 131072 maximum context"
    f" length (key {LEAKED})",
    "type": "invalid_request_invalid_args",
    "param": None,
    "code": "3051",
    "raw_status_code": 400,
}
# vLLM's engine check (a ValueError its server answers 400, flat in older versions, nested in newer).
VLLM_DECODER = {
    "object": "error",
    "message": "The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure that"
    f" `max_model_len` is no smaller than the number of text tokens. (key {LEAKED})",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
VLLM_MAX_TOKENS = {
    "error": {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 16384. This model's maximum context"
        " length is 65536 tokens and your request has 52189 input tokens (16384 > 65536 - 52189)."
        f" (parameter=max_tokens, value=16384) (key {LEAKED})",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
}
VLLM_REQUESTED = {
    "error": {
        "message": "This model's maximum context length is 131072 tokens. However, you requested 102400 output"
        " tokens and your prompt contains at least 28673 input tokens, for a total of at least 131073 tokens."
        f" Please reduce the length of the input prompt or the number of requested output tokens. (key {LEAKED})",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    }
}
# (status, body) of the servers' own wordings
SERVERS = {
    "tgi-sum": (422, TGI_SUM),
    "tgi-inputs": (422, TGI_INPUTS),
    "mistral": (400, MISTRAL),
    "mistral-coded": (400, MISTRAL_CODED),
    "vllm-decoder-prompt": (400, VLLM_DECODER),
    "vllm-max-tokens": (400, VLLM_MAX_TOKENS),
    "vllm-requested": (400, VLLM_REQUESTED),
}


async def _proxy(
    start_proxy: StartProxy, serve_routes: ServeRoutes, body: dict[str, Any], kind: str, status: int = 400
) -> Proxy:
    handle = _error(status, body)
    up = await serve_routes(
        web.post("/v1/chat/completions", handle),
        web.post("/v1/completions", handle),
        web.post("/v1/openai/deployments/{name}/chat/completions", handle),
        web.post("/v1/openai/deployments/{name}/completions", handle),
    )
    provider: dict[str, Any] = {"kind": kind, "base_url": up.url + "/v1", "api_key": "sk-up-key-0123456789"}
    return await start_proxy(
        {
            "providers": {"p": provider},
            "deployments": {"d": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )


async def _error_of(proxy: Proxy, endpoint: str, stream: bool) -> openai.APIStatusError:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as got:
            if endpoint == "chat":
                await client.chat.completions.create(model="m", messages=HI, stream=stream)
            else:
                await client.completions.create(model="m", prompt="hi", stream=stream)
    finally:
        await client.close()
    return got.value


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", LLAMA_CPP),
        ("openai", ANTHROPIC_BEHIND_A_GATEWAY),
        ("openai", OPENAI_CONTEXT),
        ("azure", AZURE_CONTEXT),
    ],
    ids=["llama-cpp", "anthropic-words", "openai", "azure"],
)
async def test_an_openai_client_catches_context_length_exceeded(
    start_proxy: StartProxy, serve_routes: ServeRoutes, kind: str, body: dict[str, Any], endpoint: str, stream: bool
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, body, kind)
    e = await _error_of(proxy, endpoint, stream)
    assert isinstance(e, openai.BadRequestError), e
    assert (e.status_code, e.code, e.type) == (400, "context_length_exceeded", "invalid_request_error")
    assert e.param == ("messages" if endpoint == "chat" else "prompt")
    assert e.message and LEAKED not in e.response.text
    rec = await recorded(proxy)
    assert rec.status == 400


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("status", "body"), list(SERVERS.values()), ids=list(SERVERS))
async def test_a_servers_own_words_for_a_prompt_too_long_are_context_length_exceeded(
    start_proxy: StartProxy, serve_routes: ServeRoutes, status: int, body: dict[str, Any], stream: bool
) -> None:
    """TGI's, Mistral's and vLLM's wordings, as their servers answer them (TGI's with a 422)."""
    proxy = await _proxy(start_proxy, serve_routes, body, "openai", status)
    e = await _error_of(proxy, "chat", stream)
    assert isinstance(e, openai.BadRequestError), e
    assert (e.status_code, e.code, e.type, e.param) == (
        400,
        "context_length_exceeded",
        "invalid_request_error",
        "messages",
    )
    assert e.message and LEAKED not in e.response.text
    assert (await recorded(proxy)).error_class == "context_window"


@pytest.mark.parametrize(
    "body",
    [
        {"error": "Input validation error: `max_new_tokens` must be <= 192. Given: 200", "error_type": "validation"},
        {"object": "error", "message": "Prompt contains forbidden words", "type": "invalid_request_error"},
        {"error": {"message": "The prompt is empty.", "type": "BadRequestError", "code": 400}},
    ],
    ids=["tgi-max-new-tokens-alone", "prompt-contains-other", "prompt-other"],
)
async def test_other_validation_errors_stay_the_clients_own(
    start_proxy: StartProxy, serve_routes: ServeRoutes, body: dict[str, Any]
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, body, "openai")
    e = await _error_of(proxy, "chat", False)
    assert e.status_code == 400 and e.code != "context_length_exceeded", e
    assert (await recorded(proxy)).error_class != "context_window"


@pytest.mark.parametrize(
    "body", [OPENAI_CONTEXT, LLAMA_CPP, ANTHROPIC_BEHIND_A_GATEWAY], ids=["openai", "llama-cpp", "anthropic-words"]
)
async def test_a_prompt_too_long_goes_to_a_larger_context_window(
    start_proxy: StartProxy, serve_routes: ServeRoutes, start_upstream: Any, body: dict[str, Any]
) -> None:
    small = await serve_routes(web.post("/v1/chat/completions", _error(400, body)))
    big = await start_upstream(record=True)
    proxy = await start_proxy(
        {
            "providers": {"small": {"base_url": small.url + "/v1"}, "big": {"base_url": big.base_url}},
            "deployments": {
                "d-small": {"provider": "small", "model": "x", "context_window": 4096},
                "d-big": {"provider": "big", "model": "x", "context_window": 100_000},
            },
            "models": {
                "m": {"deployments": ["d-small"], "context_window_fallbacks": ["big"]},
                "big": {"deployments": ["d-big"]},
            },
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=HI)
    finally:
        await client.close()
    assert raw.headers["x-edgeroute-deployment"] == "d-big"
    assert raw.parse().choices[0].message.content
    rec = await recorded(proxy)
    assert [a.outcome for a in rec.attempts] == ["context_window", "success"]


@pytest.mark.parametrize("endpoint", ["completions", "responses"])
async def test_a_prompt_over_every_window_names_the_endpoints_own_input(
    start_proxy: StartProxy, start_upstream: Any, endpoint: str
) -> None:
    up = await start_upstream()
    proxy = await start_proxy(
        {
            "providers": {"p": {"base_url": up.base_url}},
            "deployments": {"d": {"provider": "p", "model": "x", "context_window": 100}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as got:
            if endpoint == "completions":
                await client.completions.create(model="m", prompt="word " * 500)
            else:
                await client.responses.create(model="m", input="word " * 500)
    finally:
        await client.close()
    assert (got.value.code, got.value.type, got.value.param) == (
        "context_length_exceeded",
        "invalid_request_error",
        "prompt" if endpoint == "completions" else "input",
    )
