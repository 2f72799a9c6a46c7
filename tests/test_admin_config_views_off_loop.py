"""`GET /admin/config`, a version and a diff (viewer routes) parse and mask the config's YAML off the
event loop and keep the result (huntUI #1): they parsed it on the loop at every call, so a viewer
key looping on `/admin/config` stalled every client (a 3 KB config: a client's p50 from 1 to 186 ms;
here a config of 1,000 keys held the loop about a second per call)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

VIEWER = {"Authorization": "Bearer tok-viewer"}
N_KEYS = 1000


def _cfg() -> dict[str, Any]:
    keys: dict[str, Any] = {f"k{i}": {"token": f"tok-literal-{i:05d}", "role": "service"} for i in range(N_KEYS)}
    keys["viewer"] = {"token": "tok-viewer", "role": "viewer"}
    return {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-provider-literal"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": keys,
    }


async def test_config_views_leave_the_loop_free_and_are_kept(start_proxy: Any) -> None:
    proxy = await start_proxy(_cfg())
    async with aiohttp.ClientSession() as s:

        async def view(path: str) -> tuple[int, bytes]:
            async with s.get(proxy.url + path, headers=VIEWER) as r:
                return r.status, await r.read()

        paths = ["/admin/config", "/admin/config/versions/1", "/admin/config/diff?from=1&to=1"]
        calls = [asyncio.create_task(view(p)) for p in paths]
        await asyncio.sleep(0)
        worst = 0.0
        while not all(c.done() for c in calls):  # a client's cheap call meanwhile
            t = time.perf_counter()
            async with s.get(proxy.url + "/healthz") as r:
                assert r.status == 200
            worst = max(worst, time.perf_counter() - t)
            await asyncio.sleep(0.01)
        answers = [await c for c in calls]
        assert worst < 0.3, f"a client waited {worst:.2f} s behind the config views"
        assert [st for st, _ in answers] == [200, 200, 200], answers
        config, version = answers[0][1], answers[1][1]
        assert b"tok-literal-" not in config and b"sk-provider-literal" not in config
        assert b'"k999"' in config and b"tok-literal-" not in version
        t = time.perf_counter()  # kept: asked again, no parse
        again = [await view("/admin/config") for _ in range(5)]
        assert all(a == (200, config) for a in again)
        assert time.perf_counter() - t < 0.5
