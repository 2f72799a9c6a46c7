"""Three edgeroute instances, one Redis, one PostgreSQL, on loopback: do they act as one system?

Each instance is a real `edgeroute serve` process; the test client spreads requests over
them round-robin. The propagation times asserted here have generous deadlines (CI is a
loaded 2-core machine); the measured times are reported as perf figures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from tests.conftest import Upstream
from tests.perf import Perf
from tests.scale.support import REDIS_URL, Instance, Spawn
from tests.test_cost_support import require_postgres, require_redis

ADMIN = "tok-rig-admin"
MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6  # output tokens only: every answered request costs exactly this
FLUSH_S = 0.5


def _config(ups: dict[str, Upstream], prefix: str, dsn: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {n: {"base_url": u.base_url, "api_key": f"key-{n}"} for n, u in ups.items()},
        "deployments": {
            f"d-{n}": {"provider": n, "model": "gpt-4o-mini", "price": {"input_per_mtok": 0, "output_per_mtok": 2.0}}
            for n in ups
        },
        "models": {"m": {"deployments": [f"d-{n}" for n in ups]}},
        "keys": {"root": {"token": ADMIN, "role": "admin"}},
        "shared_state": {"redis_url": REDIS_URL, "prefix": prefix, "timeout_ms": 2000},
        "ledger": {"backend": "postgres", "dsn": dsn, "flush_interval": FLUSH_S},
        "governance": {"managed_keys": True, "key_poll_interval": 0.25},
        "server": {"max_in_flight": 2000},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def prefix() -> str:
    require_redis()
    require_postgres()
    return f"edgeroute-rig-{os.getpid()}-{os.urandom(4).hex()}"


async def _three(spawn: Spawn, cfg: dict[str, Any]) -> list[Instance]:
    # One after another: each creates the tables it needs, and three at once only add load.
    return [await spawn(cfg, name=f"i{i}") for i in range(3)]


def _client(inst: Instance, token: str = ADMIN) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key=token, max_retries=0, timeout=60)


async def _ask(client: openai.AsyncOpenAI) -> tuple[int, str | None]:
    """(status, the proxy's request id) of one chat request."""
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
        )
        return raw.status_code, raw.headers.get("x-request-id")
    except openai.APIStatusError as e:
        return e.status_code, None
    except openai.APIConnectionError:
        return 0, None


async def _deployment(inst: Instance, name: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        hdrs = {"Authorization": f"Bearer {ADMIN}"}
        async with s.get(inst.url + "/admin/deployments", headers=hdrs) as r:
            deps = (await r.json())["deployments"]
    return next(d for d in deps if d["name"] == name)


async def test_300_concurrent_requests_against_a_budget_for_10(
    pg_schema_dsn: str, start_upstream, spawn: Spawn, prefix: str
) -> None:
    up = await start_upstream(reply_words=40, latency_ms=20)
    # A key of this test's own: the ledger (one database for the suite) holds other tests'
    # spend today, which a global budget read back from it at start would count.
    key = f"rig-{prefix}"
    budget = {"limits": [{"name": key, "scope": "key", "match": key, "limit_usd": COST * 10.5, "period": "day"}]}
    insts = await _three(
        spawn, _config({"a": up}, prefix, pg_schema_dsn, budgets=budget, keys={key: {"token": ADMIN, "role": "admin"}})
    )
    clients = [_client(i) for i in insts]
    results = await asyncio.gather(*(_ask(clients[n % 3]) for n in range(300)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 290


@pytest.mark.perf
async def test_an_outage_seen_by_one_instance_is_avoided_by_the_others(
    pg_schema_dsn: str, start_upstream, spawn: Spawn, prefix: str, perf: Perf
) -> None:
    bad, good = await start_upstream(record=True), await start_upstream()
    cfg = _config(
        {"a": bad, "b": good}, prefix, pg_schema_dsn, health={"consecutive_failures": 2, "base_ejection_ms": 30_000}
    )
    cfg["models"]["m"]["strategy"] = "weighted"
    insts = await _three(spawn, cfg)
    bad.options.fail_status = 503
    first = _client(insts[0])
    t_open = None
    for _ in range(40):  # only instance 0 sees the outage (failing over to b each time)
        status, _ = await _ask(first)
        assert status == 200
        if (await _deployment(insts[0], "d-a"))["circuit"] == "open":
            t_open = time.monotonic()
            break
    assert t_open is not None, "instance 0 never opened d-a's circuit"
    seen = {}
    while len(seen) < 2 and time.monotonic() - t_open < 10:
        for i in (1, 2):
            if i not in seen and (await _deployment(insts[i], "d-a"))["circuit"] == "open":
                seen[i] = time.monotonic() - t_open
        await asyncio.sleep(0.02)
    assert sorted(seen) == [1, 2], f"the others did not learn of the outage within 10 s: {seen}"
    perf.report("rig: outage propagation to the other instances (max of 2)", max(seen.values()) * 1000, "ms", "< 1000")
    # The other instances send nothing to the failing deployment while it is out.
    before = len(bad.options.requests)
    for inst in insts[1:]:
        c = _client(inst)
        assert [(await _ask(c))[0] for _ in range(10)] == [200] * 10
    assert len(bad.options.requests) == before


@pytest.mark.perf
async def test_sigkill_mid_load_loses_no_spend_beyond_the_flush_window(
    pg_schema_dsn: str, start_upstream, spawn: Spawn, prefix: str, perf: Perf
) -> None:
    import psycopg

    up = await start_upstream(reply_words=40, latency_ms=5)
    budget = {"limits": [{"name": f"rig-{prefix}", "scope": "global", "limit_usd": 1000.0, "period": "day"}]}
    cfg = _config({"a": up}, prefix, pg_schema_dsn, budgets=budget)
    insts = await _three(spawn, cfg)
    clients = [_client(i) for i in insts]
    answered: list[tuple[int, str, float]] = []  # (instance, request id, when)
    stop = asyncio.Event()

    async def load(n: int) -> None:
        while not stop.is_set():
            status, rid = await _ask(clients[n])
            if status == 200 and rid:
                answered.append((n, rid, time.monotonic()))
            elif status == 0 and n == 2:
                await asyncio.sleep(0.05)  # the killed instance: nothing listens until it restarts

    tasks = [asyncio.create_task(load(n)) for n in (0, 1, 2) for _ in range(4)]
    await asyncio.sleep(3.0)
    victim = insts[2]
    t_kill = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    await victim.proc.wait()
    await asyncio.sleep(2.0)
    served_after = [a for a in answered if a[2] > t_kill and a[0] != 2]
    assert len(served_after) > 10, "the other instances stopped serving"
    # Restart the killed instance on its port: it rejoins with the shared state.
    rejoined = await spawn(cfg, port=victim.port, name="i2b")
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert any(a[0] == 2 and a[2] > t_kill for a in answered), "the restarted instance served nothing"
    budgets = []
    for inst in (insts[0], rejoined):
        async with aiohttp.ClientSession() as s:
            async with s.get(inst.url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                budgets.append((await r.json())["budgets"][0]["spent_usd"])
    # One budget, read from Redis by both: what the others spent while it was down included.
    assert budgets[1] >= len([a for a in answered if a[2] < t_kill]) * COST * 0.99
    await asyncio.sleep(FLUSH_S * 3)  # the survivors' last batches
    ids = [rid for _, rid, _ in answered]
    with psycopg.connect(pg_schema_dsn) as db:
        rows = db.execute("SELECT request_id FROM spend WHERE request_id = ANY(%s)", (ids,)).fetchall()
    recorded = {r[0] for r in rows}
    lost = [(n, rid, t) for n, rid, t in answered if rid not in recorded]
    # Only the killed instance may lose records, and only those answered in its last flush window.
    assert all(n == 2 and t_kill - t <= FLUSH_S + 1.0 for n, _, t in lost), lost
    perf.report("rig: answered requests without a spend row after SIGKILL", len(lost), "requests", "< 100")


@pytest.mark.perf
async def test_a_key_revoked_through_one_instance_is_refused_by_all(
    pg_schema_dsn: str, start_upstream, spawn: Spawn, prefix: str, perf: Perf
) -> None:
    up = await start_upstream()
    insts = await _three(spawn, _config({"a": up}, prefix, pg_schema_dsn))
    async with aiohttp.ClientSession() as s:
        hdrs = {"Authorization": f"Bearer {ADMIN}"}
        async with s.post(insts[0].url + "/admin/keys", headers=hdrs, json={"user": "rig"}) as r:
            assert r.status == 201
            made = await r.json()
    token = made["secret"]
    for inst in insts:  # usable everywhere first
        deadline = time.monotonic() + 10
        while (await _ask(_client(inst, token)))[0] != 200:
            assert time.monotonic() < deadline, "the new key never worked on " + inst.url
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as s:
        async with s.delete(insts[1].url + f"/admin/keys/{made['id']}", headers=hdrs) as r:
            assert r.status == 200
    t0 = time.monotonic()
    refused: dict[int, float] = {}
    while len(refused) < 3 and time.monotonic() - t0 < 10:
        for i, inst in enumerate(insts):
            if i not in refused and (await _ask(_client(inst, token)))[0] == 401:
                refused[i] = time.monotonic() - t0
        await asyncio.sleep(0.02)
    assert sorted(refused) == [0, 1, 2], f"not refused everywhere within 10 s: {refused}"
    perf.report(
        "rig: key revocation propagation to all instances (max of 3)", max(refused.values()) * 1000, "ms", "< 1000"
    )


async def _admin(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        hdrs = {"Authorization": f"Bearer {ADMIN}"}
        async with s.request(method, url, headers=hdrs, json=body) as r:
            return r.status, await r.json()


async def test_config_versions_live_in_the_database_every_instance_shares(
    pg_schema_dsn: str, start_upstream, spawn: Spawn, prefix: str
) -> None:
    """A config applied through one instance is a version (and an audit entry) that the others
    list, and any of them can roll back to it."""
    up = await start_upstream()
    cfg = _config({"a": up}, prefix, pg_schema_dsn)
    insts = await _three(spawn, cfg)
    added = f"m-{prefix[-8:]}"
    changed = {**cfg, "models": {**cfg["models"], added: {"deployments": ["d-a"]}}}
    insts[0].config.write_text(yaml.safe_dump(changed))
    status, body = await _admin("POST", insts[0].url + "/admin/reload")
    assert status == 200, body
    status, body = await _admin("GET", insts[0].url + "/admin/config/versions")
    made = next(v for v in body["versions"] if v["active"])
    for inst in insts[1:]:
        status, body = await _admin("GET", inst.url + "/admin/config/versions")
        assert status == 200
        assert {"version": made["version"], "hash": made["hash"]} in [
            {"version": v["version"], "hash": v["hash"]} for v in body["versions"]
        ]
        status, body = await _admin("GET", inst.url + "/admin/audit?action=config")
        assert any(e["action"] == "config.reload" and (e["after"] or {}).get("hash") == made["hash"]
                   for e in body["entries"])  # fmt: skip
    # Instance 1 never read the changed file: rolled back to the version instance 0 made, it serves it.
    client = _client(insts[1])
    assert added not in [m.id for m in (await client.models.list()).data]
    status, body = await _admin("POST", insts[1].url + "/admin/config/rollback", {"version": made["version"]})
    assert status == 200, body
    assert added in [m.id for m in (await client.models.list()).data]
