"""What an active health probe's answer says, and what it may undo.

A probe refused our credentials (401/403) or redirected (3xx, which edgeroute never follows)
says nothing either way: requests so answered fail over and take the deployment out, and the
probe must not bring it back (counted healthy, it restored them every interval); but a key may
be refused the models list alone and serve requests (OpenAI's project keys without "Models:
read"), so the probe must not take it out either (counted failed, a working provider was
ejected for good, no request reaching it). And a good probe brings back only what a failed
probe saw failing: one whose models list answered while its requests failed restored their
ejection every interval.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, simple_config


def _a_first(cfg: dict[str, Any]) -> None:
    """d-a, the cheaper, is every request's first choice whenever it is in (`lowest_cost`)."""
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0.5, "output_per_mtok": 1.0}


async def _probed(check: Any) -> bool:
    return bool(check())


async def _moved(request: web.Request) -> web.Response:
    """A provider that moved: every path redirects (edgeroute never follows a redirect, which
    would send our credentials wherever it points)."""
    raise web.HTTPTemporaryRedirect("https://elsewhere.invalid" + request.path)


def _counted(handler: Any, seen: dict[str, int], name: str) -> Any:
    async def counted(request: web.Request) -> web.StreamResponse:
        seen[name] = seen.get(name, 0) + 1
        return await handler(request)

    return counted


async def _revoked(request: web.Request) -> web.Response:
    return web.json_response(
        {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error"}}, status=401
    )


async def _answer(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )


async def _circuit_of_a(proxy: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
        return str({d["name"]: d for d in (await r.json())["deployments"]}["d-a"]["circuit"])


@pytest.mark.parametrize("refusal", ["revoked key", "redirect"])
async def test_a_probe_refused_as_requests_are_never_restores_what_they_ejected(
    refusal: str, start_upstream: Any, serve_routes: Any, start_proxy: Any
) -> None:
    good = await start_upstream()
    seen: dict[str, int] = {}
    refuse = _revoked if refusal == "revoked key" else _moved
    routes = [web.get("/v1/models", _counted(refuse, seen, "probes")), web.post("/v1/chat/completions", refuse)]
    refusing = await serve_routes(*routes)
    cfg = simple_config({"a": good, "b": good}, health={"consecutive_failures": 1, "base_ejection_ms": 600_000})
    cfg["providers"]["a"] = {"base_url": refusing.url + "/v1", "api_key": "key-a"}
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 2}
    _a_first(cfg)
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-b"  # d-a refused it; failed over
    assert await _circuit_of_a(proxy) == "open"
    probes = seen.get("probes", 0)
    await eventually(lambda: _probed(lambda: seen.get("probes", 0) - probes >= 3), "three probes after the ejection")
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-b"
        assert [a.deployment for a in proxy.recorder.records[-1].attempts] == ["d-b"]  # d-a not tried
    assert await _circuit_of_a(proxy) == "open"  # many probes later, still out


@pytest.mark.parametrize("refusal", ["no models scope", "models list moved"])
async def test_a_key_refused_the_models_list_alone_keeps_its_deployment_serving(
    refusal: str, start_upstream: Any, serve_routes: Any, start_proxy: Any
) -> None:
    """A key allowed to chat but not to list models (OpenAI's "Missing scopes: api.model.read"),
    or a models list that moved: its probe must not take out a provider that serves requests
    (it did: every interval, and no request reaching it, it never came back)."""
    seen: dict[str, int] = {}

    async def no_scope(request: web.Request) -> web.Response:
        body = {"error": {"message": "Missing scopes: api.model.read.", "type": "invalid_request_error"}}
        return web.json_response(body, status=403 if refusal == "no models scope" else 200)

    models = no_scope if refusal == "no models scope" else _moved
    scoped = await serve_routes(
        web.get("/v1/models", _counted(models, seen, "probes")), web.post("/v1/chat/completions", _answer)
    )
    good = await start_upstream()
    cfg = simple_config({"a": good, "b": good})
    cfg["providers"]["a"] = {"base_url": scoped.url + "/v1", "api_key": "key-a"}
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 2}
    _a_first(cfg)
    proxy = await start_proxy(cfg)
    await eventually(lambda: _probed(lambda: seen.get("probes", 0) >= 3), "three probes")
    assert await _circuit_of_a(proxy) == "closed"
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-edgeroute-deployment"] == "d-a"


async def test_a_good_probe_does_not_restore_what_failing_requests_ejected(
    serve_routes: Any, start_upstream: Any, start_proxy: Any
) -> None:
    """An upstream whose models list answers while its chat fails (a broken model server behind a
    healthy gateway): its probe never failed, so a good probe says nothing about what requests
    found. It restored the deployment at every interval, resetting the ejection's growth, so
    requests kept trying it first; the ejection now runs out as passive health sets it."""
    probes = 0

    async def models(request: web.Request) -> web.Response:
        nonlocal probes
        probes += 1
        return web.json_response({"object": "list", "data": []})

    async def chat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "model crashed", "type": "server_error"}}, status=500)

    broken = await serve_routes(web.get("/v1/models", models), web.post("/v1/chat/completions", chat))
    good = await start_upstream()
    cfg = simple_config({"a": good, "b": good}, health={"consecutive_failures": 1, "base_ejection_ms": 600_000})
    cfg["providers"]["a"] = {"base_url": broken.url + "/v1", "api_key": "key-a"}
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 2}
    _a_first(cfg)
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def ask() -> list[str]:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        return [a.deployment for a in proxy.recorder.records[-1].attempts]

    await eventually(lambda: _probed(lambda: probes), "a first probe")
    assert (await ask())[0] == "d-a"  # tried, failed, ejected; the answer came from d-b
    seen = probes
    await eventually(lambda: _probed(lambda: probes - seen >= 3), "three probes after the ejection")
    assert await ask() == ["d-b"]  # still out: not tried again
