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
