"""The rollback guard acts only on evidence that the reloaded config is at fault.

Round 2 found that one team still rolled back an operator's change: its slow streams plus one
incidental slow answer of another team were "several senders"; its streams filling a capacity
queue made every other team's first token "slow" (timed from the request's arrival); and the
guard's rollback brought back a deployment the operator had drained. It also never noticed a
reload that made every request a 404 (a model renamed by a typo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.governance.guard import held_for_a_human
from edgeroute.server import create_app
from tests.conftest import ServeRoutes, patience
from tests.governance_support import call, write_config
from tests.security.test_rollback_guard_clients import ADMIN, _head, _refusals, _stays
from tests.security.test_rollback_guard_clients import _config as clients_config

ALPHA, BETA = "tok-alpha-0123456789", "tok-beta-01234567890"
SLOW_S = 0.6  # a "slow" prompt's wait for its first byte: twice the guard's bound


class _Upstream:
    """A chat upstream that streams; a prompt with "slow" waits SLOW_S for its first byte, one
    with "poison" (or any, once `broken`) is a 500."""

    def __init__(self) -> None:
        self.broken = False

    def route(self) -> web.RouteDef:
        return web.post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = str(body["messages"])
        if self.broken or "poison" in prompt:
            return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=500)
        if "slow" in prompt:
            await asyncio.sleep(SLOW_S)
        if not body.get("stream"):
            return web.json_response({
                "id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            })  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delta, finish in (({"content": "ok"}, None), ({}, "stop")):
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            event = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _config(base_url: str) -> dict[str, Any]:
    """Two deployments of model `m`, an admin and teams alpha and beta, a guard on p95 300 ms."""
    cfg = clients_config(base_url)
    cfg["keys"] = {
        "ops": {"token": ADMIN, "role": "admin"},
        "alpha": {"token": ALPHA, "team": "alpha"},
        "beta": {"token": BETA, "team": "beta"},
    }
    return cfg


async def _started(serve_routes: ServeRoutes, tmp_path: Path, **guard: Any) -> tuple[_Upstream, dict[str, Any], Path]:
    """The upstream, the config (its guard's bounds replaced by `guard`, if any) and its file."""
    mock = _Upstream()
    up = await serve_routes(mock.route())
    cfg = _config(up.url + "/v1")
    if guard:
        cfg["governance"]["rollback_guard"] = {"window_s": 3.0, "min_requests": 5, **guard}
    return mock, cfg, write_config(tmp_path / "edgeroute.yaml", cfg)


@contextlib.asynccontextmanager
async def _gateway(path: Path) -> AsyncIterator[tuple[str, openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    alpha = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALPHA, max_retries=0)
    beta = openai.AsyncOpenAI(base_url=url + "/v1", api_key=BETA, max_retries=0)
    try:
        yield url, alpha, beta
    finally:
        await alpha.close()
        await beta.close()
        await server.close()


async def _reload(url: str, path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    write_config(path, cfg)
    assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
    return await _head(url)


async def _stream(client: openai.AsyncOpenAI, prompt: str, model: str = "m") -> int:
    """A streamed chat's status as the client sees it (200, or the error's)."""
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for _ in stream:
            pass
    except openai.APIStatusError as e:
        return e.status_code
    return 200


async def test_one_teams_slow_streams_and_another_teams_single_slow_one_do_not_roll_back(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    _, cfg, path = await _started(serve_routes, tmp_path)
    async with _gateway(path) as (url, alpha, beta):
        cfg["deployments"]["d2"]["weight"] = 3
        reloaded = await _reload(url, path, cfg)
        watched_until = time.monotonic() + 3.0
        # Alpha's streams are slow by its own prompt; beta's are served at once, but for one.
        asks = [_stream(alpha, "slow think") for _ in range(12)]
        asks += [_stream(beta, "hi") for _ in range(8)] + [_stream(beta, "slow one")]
        assert await asyncio.gather(*asks) == [200] * 21
        await _stays(url, reloaded, watched_until)
        # Slow for both teams alike, the config goes.
        cfg["deployments"]["d2"]["weight"] = 4
        await _reload(url, path, cfg)
        deadline = time.monotonic() + patience(10)
        while not (await _head(url))["source"].startswith("auto_rollback"):
            assert time.monotonic() < deadline, "the guard did not roll back a config slow for everyone"
            await asyncio.gather(*[_stream(c, "slow") for c in (alpha, beta) for _ in range(4)])


async def test_a_capacity_queue_one_team_fills_does_not_make_the_others_slow(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    _, cfg, path = await _started(serve_routes, tmp_path)
    async with _gateway(path) as (url, alpha, beta):
        # The operator caps each deployment at 2 requests at once, with a queue.
        for d in ("d1", "d2"):
            cfg["deployments"][d] |= {"max_concurrency": 2, "max_queue": 50, "queue_timeout_ms": 20_000}
        reloaded = await _reload(url, path, cfg)
        watched_until = time.monotonic() + 3.0
        # Alpha's slow streams hold the 4 slots; beta's ordinary ones wait in the queue for them.
        slow = [asyncio.create_task(_stream(alpha, "slow think")) for _ in range(8)]
        await asyncio.sleep(0.1)
        quick = [_stream(beta, "hi") for _ in range(8)]
        assert await asyncio.gather(*quick, *slow) == [200] * 16
        await _stays(url, reloaded, watched_until)
        assert (await _head(url))["source"] == reloaded["source"]


async def test_the_guard_leaves_a_drained_deployment_drained(serve_routes: ServeRoutes, tmp_path: Path) -> None:
    mock, _, path = await _started(serve_routes, tmp_path, max_error_rate=0.5)
    async with _gateway(path) as (url, alpha, beta):
        status, body = await call("POST", url + "/admin/deployments/d2/drain", ADMIN)
        assert status == 200, body
        drained = await _head(url)
        mock.broken = True  # failing for every team: the guard would roll back, were it not a drain
        for _ in range(5):
            assert list(await asyncio.gather(_stream(alpha, "hi"), _stream(beta, "hi"))) == [502, 502]

        entries = await _refusals(url)
        assert "deployments.d2 undrained" in entries[0]["after"]["undoes"], entries[0]
        head = await _head(url)
        assert head["version"] == drained["version"] and head["active"], head
        assert "drained: true" in path.read_text()


def test_putting_a_deployment_back_in_service_in_any_way_is_held_and_a_base_url_is_not() -> None:
    import yaml

    base: dict[str, Any] = {
        "providers": {"p": {"base_url": "http://a/v1"}, "q": {"base_url": "http://b/v1"}},
        "deployments": {"d1": {"provider": "p", "model": "x"}, "d2": {"provider": "q", "model": "x"}},
        "models": {"m": {"deployments": ["d1", "d2"], "fallbacks": ["n"]}, "n": {"deployments": ["d1"]}},
    }

    def held(change: Any) -> list[str]:
        running = yaml.safe_load(yaml.safe_dump(base))
        change(running)
        return held_for_a_human(yaml.safe_dump(running), yaml.safe_dump(base))

    assert held(lambda c: c["deployments"]["d2"].update(drained=True)) == ["deployments.d2 undrained"]
    assert held(lambda c: c["deployments"]["d2"].update(weight=0)) == ["deployments.d2 weight raised from 0"]
    assert held(lambda c: c["models"]["m"].update(deployments=["d1"])) == ["models.m.deployments: d2 brought back"]
    assert held(lambda c: c["models"]["m"].update(fallbacks=[])) == ["models.m.fallbacks: n brought back"]
    assert "providers.q brought back" in held(lambda c: (c["providers"].pop("q"), c["deployments"].pop("d2")))
    # What the guard is for: a moved base_url, a renamed model whose deployments serve on.
    assert held(lambda c: c["providers"]["p"].update(base_url="http://c/v1")) == []
    assert held(lambda c: c["models"].update(m2=c["models"].pop("m"))) == []


async def test_a_reload_that_makes_a_model_404_is_rolled_back_and_client_4xx_are_not_counted(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    _, cfg, path = await _started(serve_routes, tmp_path, max_error_rate=0.5)
    async with _gateway(path) as (url, alpha, beta):
        # Both teams ask for models that never were, and send invalid bodies: their own doing.
        cfg["deployments"]["d2"]["weight"] = 3
        reloaded = await _reload(url, path, cfg)
        watched_until = time.monotonic() + 3.0
        for client in (alpha, beta):
            for _ in range(5):
                assert await _stream(client, "hi", model="no-such-model") == 404
                status, _ = await call("POST", url + "/v1/chat/completions", ALPHA, {"model": "m", "n": -1})
                assert status == 400
            assert await _stream(client, "hi") == 200
        await _stays(url, reloaded, watched_until)
        # The operator renames `m` by a typo: every request for it is now a 404.
        cfg["models"]["m2"] = cfg["models"].pop("m")
        typo = await _reload(url, path, cfg)
        deadline = time.monotonic() + patience(10)
        # Until the rollback's version is the running one (it is recorded, then applied).
        while (head := await _head(url))["version"] == typo["version"] or not head["active"]:
            assert time.monotonic() < deadline, "the guard did not roll back a reload that 404s every request"
            assert list(await asyncio.gather(_stream(alpha, "hi"), _stream(beta, "hi"))) in ([404, 404], [200, 200])
        assert head["source"].startswith("auto_rollback"), head
        assert await _stream(alpha, "hi") == 200
