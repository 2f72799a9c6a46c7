"""A provider key that was rotated (a `file:` secret refreshed) or replaced by a reload leaves
the upstream request heads edgeroute caches.

Each request head (request line and headers, the key among them) is built once per distinct
set of headers and kept, up to 256 of them. A rotated key's heads stayed in memory, in the
head and in the cache's key, until 256 other heads pushed them out: a key an operator
rotated because it leaked stayed readable in the process (a core dump, a heap read) for as
long as traffic was light.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.server import create_app
from edgeroute.upstream_http import wire
from tests.conftest import ProxyTestServer, Upstream, eventually, simple_config
from tests.governance_support import call

OLD, NEW = "sk-old-5b1f0c9e7d", "sk-new-a83e44d210"
ADMIN = "tok-admin-0123456789"


def _cfg(up: Upstream, key: str) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["api_key"] = key
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"secrets_refresh": 0.5}
    return cfg


@asynccontextmanager
async def _serving(path: Path) -> AsyncIterator[str]:
    # The heads are kept process-wide and cleared whole at 256: filled by earlier tests, the
    # cache could be cleared between this test's chat head and its stream's (1 held, not 2).
    wire._HEADS.clear()
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)))
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def _ask(url: str, up: Upstream) -> str:
    """One chat and one stream; the key the upstream saw on the last."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        async for _ in await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
    finally:
        await client.close()
    return str(up.options.requests[-1]["headers"]["Authorization"])


def _heads_holding(secret: str) -> int:
    return sum(secret.encode() in head or any(secret in str(part) for part in key) for key, head in wire._HEADS.items())


async def test_a_rotated_file_key_leaves_the_head_cache(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    key = tmp_path / "openai-key"
    key.write_text(OLD + "\n")
    path = tmp_path / "edgeroute.yaml"
    path.write_text(yaml.safe_dump(_cfg(up, f"file:{key}")))
    async with _serving(path) as url:
        assert await _ask(url, up) == f"Bearer {OLD}"
        assert _heads_holding(OLD) >= 2  # the chat's head and the stream's
        new = tmp_path / "..data-new"  # as Kubernetes rotates a mounted secret: moved over it
        new.write_text(NEW + "\n")
        new.replace(key)

        async def rotated() -> bool:
            return await _ask(url, up) == f"Bearer {NEW}"

        await eventually(rotated, "the new key sent", within=10, every=0.2)
        sent = len(up.options.requests)
        await _ask(url, up)
        assert {r["headers"]["Authorization"] for r in up.options.requests[sent:]} == {f"Bearer {NEW}"}
        assert _heads_holding(OLD) == 0, "the rotated key is still in the request head cache"
        assert _heads_holding(NEW) >= 2


async def test_a_key_replaced_by_a_reload_leaves_the_head_cache(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    path = tmp_path / "edgeroute.yaml"
    path.write_text(yaml.safe_dump(_cfg(up, OLD)))
    async with _serving(path) as url:
        assert await _ask(url, up) == f"Bearer {OLD}"
        path.write_text(yaml.safe_dump(_cfg(up, NEW)))
        status, body = await call("POST", url + "/admin/reload", ADMIN)
        assert status == 200, body
        assert await _ask(url, up) == f"Bearer {NEW}"

        async def forgotten() -> bool:  # once the old generation's last request is done
            await asyncio.sleep(0)
            return _heads_holding(OLD) == 0

        await eventually(forgotten, "the old key's heads dropped", within=10, every=0.1)
        assert _heads_holding(NEW) >= 2
