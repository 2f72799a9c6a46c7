"""`POST /admin/config/check` cannot stall the proxy for everyone.

The route is a viewer's (a dashboard's key), and checking a config text is expensive: the
YAML loader is pure Python (about 13 s of CPU per MiB of YAML) and its garbage stalls the event
loop for up to a second per MiB. A viewer sending two checks of 9.5 MB (under the body limit)
took 256 s of CPU and stalled every other client's requests by up to 19 s. Now a text is at
most 256 KiB (413 `config_too_large`, refused before it is read when its length is
announced), and checks run one at a time per process (429 `check_busy`, `Retry-After`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.conftest import eventually, simple_config

VIEWER = "tok-viewer-0123456789"


def _models(n: int) -> str:
    return "models:\n" + "".join(f"  m{i}: {{deployments: [d{i % 7}], tags: [a, b, c]}}\n" for i in range(n))


async def test_a_config_check_is_bounded_in_size_and_runs_alone(start_upstream: Any, start_proxy: Any) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"dash": {"token": VIEWER, "role": "viewer"}}
    proxy = await start_proxy(cfg)
    auth = {"Authorization": f"Bearer {VIEWER}"}
    url = proxy.url + "/admin/config/check"
    async with aiohttp.ClientSession() as s:
        huge = _models(25_000).encode()  # about 1.2 MB
        assert len(huge) > 1024 * 1024
        started = time.monotonic()
        async with s.post(url, data=huge, headers=auth) as r:
            body = await r.json()
            assert r.status == 413 and body["error"]["code"] == "config_too_large", body
        assert time.monotonic() - started < 1.0
        # The same refusal for a body whose length is not announced (chunked).

        async def chunks() -> Any:
            for i in range(0, len(huge), 65536):
                yield huge[i : i + 65536]

        async with s.post(url, data=chunks(), headers=auth) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "config_too_large"

        # A text within the bound is checked; while it is, another check waits its turn (429).
        big = _models(4_000).encode()
        assert len(big) < 256 * 1024

        async def check_big() -> tuple[int, Any]:
            async with s.post(url, data=big, headers=auth) as r:
                return r.status, await r.json()

        first = asyncio.create_task(check_big())

        async def busy() -> bool:
            nonlocal first
            if first.done():  # a probe came first, or it ended before one met it: again
                first = asyncio.create_task(check_big())
                return False
            async with s.post(url, data=b"models: {}\n", headers=auth) as r:
                if r.status == 429:
                    assert (await r.json())["error"]["code"] == "check_busy" and r.headers["Retry-After"] == "1"
                    return True
                assert r.status == 200
                return False

        await eventually(busy, "a second check refused while the first runs", every=0.02)
        status, got = await first
        assert status == 200 and got["ok"] is False, got  # its models name no deployment
        async with s.post(url, data=b"models: {}\n", headers=auth) as r:
            assert r.status == 200 and "ok" in await r.json()
