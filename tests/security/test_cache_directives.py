"""A client's cache directive holds on every endpoint: `only-if-cached` means "spend nothing
upstream", so an endpoint that never caches (`/v1/completions`, `/v1/responses`) answers it
504 as a cacheless route does on chat, not with a paid upstream call; a bad value is a 400
naming the header there too (it was silently ignored)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import simple_config


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/responses", {"input": "hi"}),
        ("/v1/responses", {"input": "hi", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),  # as it always was
    ],
)
async def test_cache_directives_hold_on_endpoints_that_never_cache(
    start_upstream: Any, start_proxy: Any, path: str, body: dict[str, Any]
) -> None:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    body = {"model": "m", **body}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, json=body, headers={"x-edgeroute-cache": "only-if-cached"}) as r:
            assert r.status == 504, await r.text()
            assert (await r.json())["error"]["code"] == "cache_miss"
        async with s.post(proxy.url + path, json=body, headers={"x-edgeroute-cache": "nope"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "x-edgeroute-cache"
    assert up.options.requests == []  # nothing was spent upstream
