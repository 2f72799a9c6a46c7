"""A client cannot make the rollback guard undo an operator's change by how it asks.

The guard timed every answer whole: a key asking for long generations (`max_tokens`) passed
`max_p95_ms` at will, and the guard rolled back the reload before them, a budget cut or a
deployment taken away included. It now judges a stream by its first token and a whole answer
only when it is short, and never undoes by itself a tightened cost control or a removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import openai
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ServeRoutes, eventually, patience
from tests.governance_support import call, write_config

ADMIN, TENANT, OTHER = "tok-admin-0123456789", "tok-tenant-0123456789", "tok-other-0123456789"
MS_PER_TOKEN = 0.004  # the upstream's generation speed: max_tokens 150 take 0.6 s


class _Upstream:
    """A chat upstream that takes MS_PER_TOKEN per token asked for, or fails once `broken`."""

    def __init__(self) -> None:
        self.broken = False

    def route(self) -> web.RouteDef:
        return web.post("/v1/chat/completions", self.generate)

    async def generate(self, request: web.Request) -> web.Response:
        return await _generate(request, self.broken)


async def _generate(request: web.Request, broken: bool) -> web.Response:
    body = await request.json()
    n = int(body.get("max_tokens") or 1)
    if broken or "poison" in str(body["messages"]):  # a prompt this upstream fails on (a 500)
        return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=500)
    await asyncio.sleep(n * MS_PER_TOKEN)
    return web.json_response({
        "id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * n}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5},
    })  # fmt: skip


def _config(base_url: str) -> dict[str, Any]:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    return {
        "providers": {"p": {"base_url": base_url, "api_key": "key-p"}},
        "deployments": {n: {"provider": "p", "model": "gpt-4o-mini", "price": price} for n in ("d1", "d2")},
        "models": {"m": {"deployments": ["d1", "d2"]}},
        "keys": {
            "ops": {"token": ADMIN, "role": "admin"},
            "tenant": {"token": TENANT, "team": "t1"},
            "other": {"token": OTHER, "team": "t2"},
        },
        "budgets": {"limits": [{"name": "t1", "scope": "team", "match": "t1", "limit_usd": 100}]},
        "governance": {"rollback_guard": {"window_s": 3.0, "max_p95_ms": 300, "min_requests": 5}},
    }


@contextlib.asynccontextmanager
async def _gateway(path: Path) -> Any:
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TENANT, max_retries=0)
    try:
        yield url, client
    finally:
        await client.close()
        await server.close()


async def _head(url: str) -> dict[str, Any]:
    status, body = await call("GET", url + "/admin/config/versions", ADMIN)
    assert status == 200, body
    return dict(body["versions"][0])


async def _stays(url: str, reloaded: dict[str, Any], watched_until: float) -> None:
    """Through the guard's window (checked every 0.5 s), the reloaded version stays."""
    while time.monotonic() < watched_until + patience(1.0):
        head = await _head(url)
        assert head["version"] == reloaded["version"] and head["active"], head
        await asyncio.sleep(0.1)


async def _refusals(url: str) -> list[dict[str, Any]]:
    """The guard's audited refusals to roll back, once there is one."""

    async def refused() -> list[dict[str, Any]] | None:
        status, body = await call("GET", url + "/admin/audit?action=config.auto_rollback_refused", ADMIN)
        assert status == 200, body
        return body["entries"] or None

    entries = await eventually(refused, "the guard's refusal, audited", within=patience(10))
    assert entries is not None
    return entries


async def _error_guarded(serve_routes: ServeRoutes, tmp_path: Path) -> tuple[_Upstream, dict[str, Any], Path]:
    """The upstream, the config (a guard on the error rate alone) and its file."""
    mock = _Upstream()
    up = await serve_routes(mock.route())
    cfg = _config(up.url + "/v1")
    cfg["governance"]["rollback_guard"] = {"window_s": 3.0, "max_error_rate": 0.5, "min_requests": 5}
    return mock, cfg, write_config(tmp_path / "edgeroute.yaml", cfg)


async def test_long_generations_do_not_roll_back_a_reload(serve_routes: ServeRoutes, tmp_path: Path) -> None:
    mock = _Upstream()
    up = await serve_routes(mock.route())
    cfg = _config(up.url + "/v1")
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    async with _gateway(path) as (url, tenant):
        # The operator reweights the deployments (a reload the guard watches).
        cfg["deployments"]["d2"]["weight"] = 3
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
        reloaded = await _head(url)
        # The tenant asks for long answers: each takes 0.6 s, twice the bound, by its own choice.
        watched_until = time.monotonic() + 3.0
        for _ in range(3):
            essay: Any = [{"role": "user", "content": "essay"}]
            asks = [tenant.chat.completions.create(model="m", messages=essay, max_tokens=150) for _ in range(4)]
            got = await asyncio.gather(*asks)
            assert all(r.usage is not None and r.usage.completion_tokens == 150 for r in got)
        await _stays(url, reloaded, watched_until)


async def test_the_guard_leaves_a_budget_cut_and_a_removal_to_a_human(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    mock, cfg, path = await _error_guarded(serve_routes, tmp_path)
    async with _gateway(path) as (url, tenant):
        # The operator cuts the tenant's budget and takes d2 away; then the upstream fails.
        cfg["budgets"]["limits"][0]["limit_usd"] = 1
        del cfg["deployments"]["d2"]
        cfg["models"]["m"]["deployments"] = ["d1"]
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
        reloaded = await _head(url)
        mock.broken = True  # for every team
        other = openai.AsyncOpenAI(base_url=url + "/v1", api_key=OTHER, max_retries=0)
        for _ in range(8):
            for client in (tenant, other):
                with contextlib.suppress(openai.APIStatusError):
                    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await other.close()

        entries = await _refusals(url)
        undoes = entries[0]["after"]["undoes"]
        assert "deployments.d2 brought back" in undoes and "budget t1 loosened" in undoes, entries[0]
        head = await _head(url)
        assert head["version"] == reloaded["version"] and head["active"], head
        assert "limit_usd: 1\n" in path.read_text() and "d2:" not in path.read_text()


async def test_one_teams_failing_requests_do_not_roll_back_while_others_are_served(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    mock, cfg, path = await _error_guarded(serve_routes, tmp_path)
    async with _gateway(path) as (url, tenant):
        other = openai.AsyncOpenAI(base_url=url + "/v1", api_key=OTHER, max_retries=0)
        try:
            cfg["deployments"]["d2"]["weight"] = 3
            write_config(path, cfg)
            assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
            reloaded = await _head(url)
            # Team t1 sends prompts the upstream fails on; team t2 is served as before.
            watched_until = time.monotonic() + 3.0
            hi: Any = [{"role": "user", "content": "hi"}]
            for _ in range(3):
                await other.chat.completions.create(model="m", messages=hi)
            for _ in range(10):
                with contextlib.suppress(openai.APIStatusError):
                    await tenant.chat.completions.create(model="m", messages=[{"role": "user", "content": "poison"}])
            await _stays(url, reloaded, watched_until)
            # Failing for both teams, the config goes.
            cfg["deployments"]["d2"]["weight"] = 4
            write_config(path, cfg)
            assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
            mock.broken = True
            deadline = time.monotonic() + patience(10)
            while not (await _head(url))["source"].startswith("auto_rollback"):
                assert time.monotonic() < deadline, "the guard did not roll back a config failing for everyone"
                for client in (tenant, other):
                    with contextlib.suppress(openai.APIStatusError):
                        await client.chat.completions.create(model="m", messages=hi)
        finally:
            await other.close()
