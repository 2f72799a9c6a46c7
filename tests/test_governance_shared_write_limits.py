"""The admin write limits hold across instances that share Redis.

`governance.key_writes_per_minute` and the test notifications a caller may ask for a minute
(`POST /admin/alerts/test`) were token buckets in each process: with `--workers 2`, or two
instances, a caller had twice the limit (N times, with N). With `shared_state` the buckets are
in Redis, so the instances together allow the limit once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.conftest import simple_config, start_routes
from tests.governance_support import call
from tests.test_cost_support import cost_proxy, require_redis

ADMIN = "tok-admin-0123456789"


@contextlib.asynccontextmanager
async def _two_instances(start_upstream: Any, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    hook = await start_routes(web.post("/hook", lambda _: web.Response()))
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_writes_per_minute": 2}
    cfg["alerts"] = {"webhooks": {"oncall": {"url": f"{hook.url}/hook"}}}
    cfg["shared_state"] = {"redis_url": require_redis(), "prefix": f"writes-{os.getpid()}-{tmp_path.name}"}
    try:
        async with (
            cost_proxy({**cfg, "ledger": {"path": str(tmp_path / "a.db")}}) as a,
            cost_proxy({**cfg, "ledger": {"path": str(tmp_path / "b.db")}}) as b,
        ):
            yield a.url, b.url
    finally:
        await hook.close()


async def test_key_writes_are_limited_across_instances_sharing_redis(start_upstream: Any, tmp_path: Path) -> None:
    async with _two_instances(start_upstream, tmp_path) as (a, b):
        for _ in range(2):
            status, body = await call("POST", a + "/admin/keys", ADMIN, json={"team": "t"})
            assert status == 201, body
        status, body = await call("POST", b + "/admin/keys", ADMIN, json={"team": "t"})
        assert status == 429 and body["error"]["code"] == "key_writes_rate_limited", body


async def test_alert_tests_are_limited_across_instances_sharing_redis(start_upstream: Any, tmp_path: Path) -> None:
    async with _two_instances(start_upstream, tmp_path) as (a, b):
        for _ in range(3):  # ALERT_TESTS_PER_MINUTE
            status, body = await call("POST", a + "/admin/alerts/test", ADMIN)
            assert status == 200 and body["queued"] == ["oncall"], body
        status, body = await call("POST", b + "/admin/alerts/test", ADMIN)
        assert status == 429 and body["error"]["code"] == "alerts_test_rate_limited", body


async def test_without_redis_answering_each_process_limits_on_its_own(caplog: Any) -> None:
    from edgeroute.config import SharedState
    from edgeroute.governance.write_limit import WriteLimit
    from tests.serve_support import free_port

    limit = WriteLimit(SharedState(redis_url=f"redis://127.0.0.1:{free_port()}/0", timeout_ms=100), "t")
    try:
        waits = [await limit.take("writer", 2) for _ in range(3)]
    finally:
        await limit.close()
    assert waits[:2] == [0.0, 0.0] and 0 < waits[2] <= 30, waits
    said = [r.getMessage() for r in caplog.records if "write limits" in r.getMessage()]
    assert said == ["write limits: Redis does not answer (ConnectionError); each process limits on its own"], said
