"""The root admin key of the `governed` proxy (`conftest.py`: managed keys on) and a JSON call
to its admin API, for the key-scope tests."""

from __future__ import annotations

from typing import Any

import aiohttp

ROOT = "tok-root-0123456789"
USER: Any = [{"role": "user", "content": "hi"}]


async def call(s: aiohttp.ClientSession, method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with s.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json()


async def config_views(s: aiohttp.ClientSession, url: str, token: str) -> dict[str, str]:
    """What `token` reads of the config, versions 1 and 2 (a proxy whose config changed once):
    the running config, version 1, and their diff, by path."""
    views = {}
    for path in ("/admin/config", "/admin/config/versions/1", "/admin/config/diff?from=1&to=2"):
        async with s.get(url + path, headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200, path
            views[path] = await r.text()
    return views
