"""What an active health probe's answer says, and what it may undo.

A probe refused our credentials (401/403) or redirected (3xx, which edgeroute never follows) is
a failed probe, as requests so answered fail: it counted as healthy, so a provider that revoked
our key or moved was never ejected by its probe, and every interval the probe restored the
deployments that user requests' failures had ejected. And a good probe brings
back only what a failed probe saw failing: one whose models list answered while its requests
failed restored their ejection every interval.
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


@pytest.mark.parametrize("refusal", ["revoked key", "redirect"])
async def test_a_probe_refused_as_requests_are_ejects_and_never_restores(
    refusal: str, start_upstream: Any, serve_routes: Any, start_proxy: Any
) -> None:
    good = await start_upstream(record=True)
    cfg = simple_config({"a": good, "b": good}, health={"base_ejection_ms": 600_000})
    if refusal == "revoked key":
        cfg["providers"]["a"]["base_url"] = (await start_upstream(api_key="a-rotated-key")).base_url
    else:
        moved = await serve_routes(web.get("/v1/models", _moved), web.post("/v1/chat/completions", _moved))
        cfg["providers"]["a"]["base_url"] = moved.url + "/v1"
    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 2}
    _a_first(cfg)
    proxy = await start_proxy(cfg)

    async def circuit_of_a() -> str:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
            return str({d["name"]: d for d in (await r.json())["deployments"]}["d-a"]["circuit"])

    async def ejected() -> bool:
        return await circuit_of_a() == "open"

    # Before any user request: the probe alone finds the provider refusing what requests would send.
    await eventually(ejected, f"d-a ejected by its probe ({refusal})", within=10)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-b"
        assert [a.deployment for a in proxy.recorder.records[-1].attempts] == ["d-b"]  # d-a not tried
    assert await circuit_of_a() == "open"  # many probes later, still out


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
