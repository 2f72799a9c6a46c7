"""A config change through the admin API answers within a bound when the store hangs.

The instance reaches PostgreSQL through a forwarder that holds every connection's bytes (a
partition that drops packets: no error on either side). An action's audit entry (an alert
test's) held its answer as long; it is waited for 5 s now. A deployment change (or a rollback)
records its version and audit entries before it is applied; that write hung as long as the
partition, and so did the admin call. Now the call answers 503 at the store's deadline (5 s),
in the API's format, and says what is true: the record was sent, so the change may be applied
(it is, once the store answers: the partition heals and it shows in the versions), or, for a
change that could not send its record (here: one behind the change still waiting), that
nothing was applied (and it never is).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import yaml

from tests.conftest import simple_config
from tests.scale import test_admin_calls_with_a_hung_key_poll as hung_poll
from tests.scale.support import Spawn
from tests.scale.test_admin_calls_with_a_hung_key_poll import Holds
from tests.test_cost_support import RedisServer

held_pg = hung_poll.held_pg  # a DSN through a forwarder whose connections the test holds

ADMIN = "tok-admin"
DEADLINE_S = 5.0  # the governance store's deadline for an admin call
SLACK_S = 3.0  # the answer's way back on a busy machine


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
    """(status, body, seconds taken); the client gives up past 30 s (the call hung)."""
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {ADMIN}"}, timeout=aiohttp.ClientTimeout(total=30)
        ) as s,
        s.request(method, url + path, json=body) as r,
    ):
        return r.status, await r.json(), time.monotonic() - started


async def test_a_config_change_on_a_hung_store_answers_at_the_deadline_truly(
    held_pg: tuple[str, Holds], spawn: Spawn, start_upstream: Any, redis_server: RedisServer
) -> None:
    dsn, r = held_pg
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["ledger"] = {"backend": "postgres", "dsn": dsn, "flush_interval": 0.1}
    cfg["shared_state"] = {"redis_url": redis_server.url, "prefix": "hungapply"}
    inst = await spawn(cfg)
    status, before, _ = await _admin(inst.url, "GET", "/admin/config/versions")
    assert status == 200, before
    newest = before["versions"][0]["version"]

    r.all = True  # every connection to PostgreSQL goes silent
    # An action audited on its own (an alert test) is answered once its entry had its 5 s.
    status, got, took = await _admin(inst.url, "POST", "/admin/alerts/test")
    assert status == 200 and took < DEADLINE_S + SLACK_S, (status, got, took)
    r.heal()  # its entry lands (the next change waits for nothing)
    status, audit, _ = await _admin(inst.url, "GET", "/admin/audit?action=alerts.test")
    assert status == 200 and len(audit["entries"]) == 1, audit

    r.all = True
    sent = asyncio.ensure_future(_admin(inst.url, "PATCH", "/admin/deployments/d-a", {"weight": 3}))
    await asyncio.sleep(1.0)  # its record is sent, and hangs
    status, got, took = await _admin(inst.url, "PATCH", "/admin/deployments/d-a", {"weight": 4})
    assert status == 503 and took < DEADLINE_S + SLACK_S, (status, got, took)
    assert got["error"]["code"] == "config_store_unavailable", got
    assert "not applied" in got["error"]["message"], got
    status, got, took = await sent
    assert status == 503 and took < DEADLINE_S + SLACK_S, (status, got, took)
    assert got["error"]["code"] == "config_change_unconfirmed" and got["error"]["type"] == "service_unavailable", got
    assert "may have been applied" in got["error"]["message"], got
    assert "/admin/config/versions" in got["error"]["message"], got

    r.heal()  # the store answers: the change sent is recorded and applied; the other one never is
    deadline = time.monotonic() + 20
    while True:
        status, after, _ = await _admin(inst.url, "GET", "/admin/config/versions")
        if (status == 200 and after["versions"][0]["version"] > newest) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert status == 200, after
    made = [v for v in after["versions"] if v["version"] > newest]
    assert [(v["source"], v["active"]) for v in made] == [("api", True)], made
    status, running, _ = await _admin(inst.url, "GET", "/admin/config")
    assert running["config"]["deployments"]["d-a"]["weight"] == 3, running
    status, audit, _ = await _admin(inst.url, "GET", "/admin/audit?action=deployment")
    assert [e["after"] for e in audit["entries"]] == [{"weight": 3}], audit

    # A reload of the edited file on a hung store answers at the deadline too (it hung as long).
    on_disk = yaml.safe_load(inst.config.read_text())
    on_disk["deployments"]["d-a"]["weight"] = 7
    inst.config.write_text(yaml.safe_dump(on_disk))
    r.all = True
    status, got, took = await _admin(inst.url, "POST", "/admin/reload")
    assert status == 503 and took < DEADLINE_S + SLACK_S, (status, got, took)
    assert got["error"]["code"] == "config_change_unconfirmed", got
    r.heal()
    deadline = time.monotonic() + 20
    while True:
        status, running, _ = await _admin(inst.url, "GET", "/admin/config")
        if running["config"]["deployments"]["d-a"]["weight"] == 7 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert running["config"]["deployments"]["d-a"]["weight"] == 7, running
