"""A client cannot make the rollback guard undo the config an operator just applied.

The guard (`governance.rollback_guard`) rolls a reloaded config back when its answers' error
rate passes a bound in its window. It counted every 5xx, and `x-edgeroute-cache:
only-if-cached` makes one at will: a miss is a 504 `cache_miss`, never an upstream call. Any
key (a service key, another team's) that sent `min_requests` of them after a reload rolled
the gateway back to the config before it: a key's tightened budget, a new rule, a model
taken away, all undone by the client they were meant to hold. A miss the client asked for
now says nothing of the config and is not counted; the upstream's failures still are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import patience, simple_config
from tests.governance_support import call, write_config

ADMIN, TENANT, OTHER = "tok-admin-0123456789", "tok-tenant-0123456789", "tok-other-0123456789"
HI: Any = [{"role": "user", "content": "hi"}]


async def _versions(url: str) -> list[dict[str, Any]]:
    status, body = await call("GET", url + "/admin/config/versions", ADMIN)
    assert status == 200, body
    return list(body["versions"])


async def test_only_if_cached_misses_do_not_roll_back_a_reload(start_upstream: Any, tmp_path: Path) -> None:
    good, broken = await start_upstream(), await start_upstream(fail_status=500)
    cfg = simple_config({"a": good})
    cfg["models"]["m"]["cache"] = {"ttl": 600}
    cfg["keys"] = {
        "ops": {"token": ADMIN, "role": "admin"},
        "tenant": {"token": TENANT, "team": "t1"},
        "other": {"token": OTHER, "team": "t2"},
    }
    window_s = 3.0
    cfg["governance"] = {"rollback_guard": {"window_s": window_s, "max_error_rate": 0.5, "min_requests": 5}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    tenant = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TENANT, max_retries=0)
    other = openai.AsyncOpenAI(base_url=url + "/v1", api_key=OTHER, max_retries=0)
    try:
        # The operator holds the tenant to a budget (a reload, watched by the guard).
        cfg["budgets"] = {"limits": [{"name": "t1", "scope": "team", "match": "t1", "limit_usd": 5}]}
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
        reloaded = (await _versions(url))[0]
        assert reloaded["active"] and reloaded["version"] == 2, reloaded
        # The tenant asks for answers that were never cached, more than min_requests times.
        watched_until = time.monotonic() + window_s
        for i in range(20):
            with pytest.raises(openai.APIStatusError) as e:
                await tenant.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"never asked {i}"}],
                    extra_headers={"x-edgeroute-cache": "only-if-cached"},
                )  # fmt: skip
            assert e.value.status_code == 504
        # Through the guard's window (checked every 0.5 s), the reload stays.
        while time.monotonic() < watched_until + patience(1.0):
            head = (await _versions(url))[0]
            assert head["version"] == reloaded["version"] and head["active"], head
            await asyncio.sleep(0.1)
        # The upstream's failures are still the config's (for every team): a reload onto a broken
        # provider goes.
        cfg["providers"]["a"]["base_url"] = broken.base_url
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
        deadline = time.monotonic() + patience(20)
        while not (await _versions(url))[0]["source"].startswith("auto_rollback"):
            assert time.monotonic() < deadline, "the guard did not roll back a broken provider"
            for client in (tenant, other):
                with contextlib.suppress(openai.APIStatusError):
                    await client.chat.completions.create(model="m", messages=HI, max_tokens=5)
    finally:
        await tenant.close()
        await other.close()
        await server.close()
