"""A client's own words quoted in an upstream's error never change what the error means.

Upstreams quote client input in their 400s (OpenAI: "Unrecognized request argument supplied: X").
The class of an error was decided by phrases found anywhere in its body, so a client that sent a
field named "incorrect api key" had its own 400 taken as our refused key: it failed over to every
deployment, the client got a 502, and the deployments' circuits opened for everyone (red9 F1).
A field named "context_length_exceeded" or "content_filter" likewise turned it into a context
overflow (fallbacks to larger, pricier models) or a content refusal. Classes now come from the
error's structured fields. And OpenAI's `insufficient_quota` (a 429 about our account's billing)
is our account's failure: it fails over and never reaches the client as a rate limit to retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.config import Provider
from edgeroute.mock.openai import completion_body
from edgeroute.outcome import Outcome
from edgeroute.providers import adapter_for
from tests.conftest import Proxy, ServeRoutes
from tests.dispatch_support import recorded

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HI = [{"role": "user", "content": "hi"}]
KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "n"}


def _quoting_upstream(calls: list[str]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """api.openai.com's answer to an unknown top-level argument: a 400 that quotes its name."""

    async def handle(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        calls.append(request.host)
        unknown = [k for k in body if k not in KNOWN]
        if unknown:
            err = {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return web.json_response({"error": err}, status=400)
        return web.Response(body=completion_body("c", 1, "x", "ok", "stop", 1, 1), content_type="application/json")

    return handle


async def _two_deployments(start_proxy: StartProxy, serve_routes: ServeRoutes, *handles: Any) -> Proxy:
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {"m": {"deployments": []}}}
    for i, handle in enumerate(handles):
        up = await serve_routes(web.post("/v1/chat/completions", handle))
        cfg["providers"][f"p{i}"] = {"base_url": up.url + "/v1", "api_key": "sk-up-key-0123456789"}
        cfg["deployments"][f"d{i}"] = {"provider": f"p{i}", "model": "x"}
        cfg["models"]["m"]["deployments"].append(f"d{i}")
    return await start_proxy(cfg)


async def _deployments(proxy: Proxy) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        return {d["name"]: d for d in (await r.json())["deployments"]}


@pytest.mark.parametrize("field", ["incorrect api key", "invalid_api_key", "context_length_exceeded", "content_filter"])
async def test_a_field_name_quoted_in_a_400_stays_the_clients_400(
    start_proxy: StartProxy, serve_routes: ServeRoutes, field: str
) -> None:
    calls: list[str] = []
    handle = _quoting_upstream(calls)
    proxy = await _two_deployments(start_proxy, serve_routes, handle, handle)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        for _ in range(6):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model="m", messages=HI, extra_body={field: 1})
            assert (e.value.status_code, e.value.code) == (400, "upstream_client_error")
            assert field in e.value.message  # the upstream's own words, as before
        assert len(calls) == 6  # one upstream call each: nothing failed over
        rec = await recorded(proxy, 6)
        assert [a.outcome for a in rec.attempts] == ["client_error"]
        for d in (await _deployments(proxy)).values():
            assert d["circuit"] == "closed" and d["failures"] == 0, d
        ok = await client.chat.completions.create(model="m", messages=HI)
        assert ok.choices[0].message.content == "ok"
    finally:
        await client.close()


QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}


async def _no_quota(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response(QUOTA, status=429)


async def test_insufficient_quota_fails_over_to_another_deployment(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    calls: list[str] = []
    proxy = await _two_deployments(start_proxy, serve_routes, _no_quota, _quoting_upstream(calls))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        for _ in range(4):  # whichever deployment is tried first, the answer is the other's
            got = await client.chat.completions.create(model="m", messages=HI)
            assert got.choices[0].message.content == "ok"
    finally:
        await client.close()
    outcomes = [a.outcome for r in proxy.recorder.records for a in r.attempts]
    assert "rate_limited" not in outcomes and "auth_error" in outcomes, outcomes
    assert (await _deployments(proxy))["d0"]["failures"] > 0  # charged to the account's deployment


async def test_insufficient_quota_everywhere_is_the_gateways_error_not_a_rate_limit(
    start_proxy: StartProxy, serve_routes: ServeRoutes
) -> None:
    proxy = await _two_deployments(start_proxy, serve_routes, _no_quota, _no_quota)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="m", messages=HI)
    finally:
        await client.close()
    assert e.value.status_code in (502, 503), e.value
    assert e.value.code != "upstream_rate_limited"
    text = e.value.response.text.lower()
    assert "quota" not in text and "billing" not in text, text
    rec = await recorded(proxy)
    assert [a.outcome for a in rec.attempts] == ["auth_error", "auth_error"]


ECHOED = "Unrecognized request argument supplied: "


def _gemini(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT", **extra}}


@pytest.mark.parametrize(
    ("kind", "status", "body", "cls"),
    [
        # The phrases the classes were read from, quoted from the client: the client's error.
        ("openai", 400, {"error": {"message": ECHOED + "incorrect api key", "code": None}}, Outcome.CLIENT_ERROR),
        ("openai", 400, {"error": {"message": ECHOED + "maximum context length"}}, Outcome.CLIENT_ERROR),
        ("openai", 400, {"error": {"message": ECHOED + "content_policy"}}, Outcome.CLIENT_ERROR),
        (
            "anthropic",
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "x: prompt is too long"}},
            Outcome.CLIENT_ERROR,
        ),
        (
            "anthropic",
            400,
            {"type": "error", "error": {"type": "invalid_request_error", "message": "overloaded_error"}},
            Outcome.CLIENT_ERROR,
        ),
        (
            "gemini",
            400,
            _gemini("Invalid value at 'API_KEY_INVALID' (input token count)"),
            Outcome.CLIENT_ERROR,
        ),
        (
            "bedrock",
            400,
            {"message": "extraneous key [ThrottlingException too long] is not permitted"},
            Outcome.CLIENT_ERROR,
        ),
        ("bedrock", 400, {"message": "extraneous key [service quota] is not permitted"}, Outcome.CLIENT_ERROR),
        # The providers' own fields and openings still decide.
        ("openai", 400, {"error": {"message": "x", "code": "invalid_api_key"}}, Outcome.AUTH_ERROR),
        ("openai", 429, QUOTA, Outcome.AUTH_ERROR),
        (
            "openai",
            400,
            {"error": {"message": "This model's maximum context length is 8000 tokens."}},
            Outcome.CONTEXT_WINDOW,
        ),
        (
            "openai",
            400,
            {"object": "error", "message": "This model's maximum context length is 4096", "code": 400},
            Outcome.CONTEXT_WINDOW,
        ),
        (
            "anthropic",
            400,
            {"type": "error", "error": {"type": "authentication_error", "message": "x"}},
            Outcome.AUTH_ERROR,
        ),
        (
            "anthropic",
            500,
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            Outcome.RATE_LIMITED,
        ),
        (
            "gemini",
            400,
            _gemini("API key not valid.", details=[{"reason": "API_KEY_INVALID"}]),
            Outcome.AUTH_ERROR,
        ),
        ("bedrock", 400, {"__type": "com.amazon.coral#ThrottlingException", "message": "x"}, Outcome.RATE_LIMITED),
        (
            "bedrock",
            400,
            {"message": "The model returned the following errors: Input is too long for requested model."},
            Outcome.CONTEXT_WINDOW,
        ),
    ],
)
def test_classes_come_from_fields_not_from_quoted_words(kind: str, status: int, body: Any, cls: Outcome) -> None:
    adapter = adapter_for(kind)("p", Provider(kind=kind, base_url="http://127.0.0.1:1"), None)  # type: ignore[arg-type]
    assert adapter.classify(status, orjson.dumps(body)) is cls


def test_bedrock_reads_the_exception_type_header() -> None:
    adapter = adapter_for("bedrock")("p", Provider(kind="bedrock", base_url="http://127.0.0.1:1"), None)  # type: ignore[arg-type]
    headers = {"x-amzn-ErrorType": "ServiceQuotaExceededException:http://internal.amazon.com/coral/"}
    assert adapter.classify(400, b'{"message":"quota"}', headers) is Outcome.RATE_LIMITED
    assert adapter.classify(400, b'{"message":"quota"}') is Outcome.CLIENT_ERROR
