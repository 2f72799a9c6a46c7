"""Managed keys' budgets hold money: they survive a hard kill, a key's budget bounds what the
keys it created spend together, and a budget given to a key later counts the month so far.
Real `edgeroute serve` processes, the openai SDK as client, every request costing $0.01."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import eventually
from tests.governance_support import call
from tests.test_cost_restart import CENT, Served
from tests.test_cost_support import answered, require_redis

ADMIN = "tok-admin"


def _config(upstream: str, tmp: Path) -> Path:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(tmp / "l.db"), "flush_interval": 0.1},
        "keys": {"root": {"token": ADMIN, "role": "admin"}},
        "governance": {"managed_keys": True, "key_poll_interval": 0.2},
    }
    path = tmp / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _admitted(url: str, token: str, n: int) -> int:
    """How many of `n` sequential requests the key gets answered (the rest: 429 budget)."""
    return await answered(url, n, token, refused_for="budget")


async def _key(url: str, token: str, **fields: Any) -> dict[str, Any]:
    status, made = await call("POST", url + "/admin/keys", token, json=fields)
    assert status == 201, made
    return dict(made)


async def _spent(url: str, key_id: str) -> float:
    status, view = await call("GET", url + "/admin/budgets", ADMIN)
    assert status == 200, view
    (row,) = [b for b in view["budgets"] if b["name"] == f"key:{key_id}"]
    return float(row["spent_usd"])


async def test_a_managed_keys_budget_is_not_forgotten_across_a_hard_kill(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    first = await Served.start(path)
    try:
        key = await _key(first.url, ADMIN, budget_usd=0.05)
        assert await _admitted(first.url, key["secret"], 8) == 5
        assert await _spent(first.url, key["id"]) == 0.05
        await asyncio.sleep(0.4)  # past one flush interval
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        assert await _spent(second.url, key["id"]) == 0.05
        assert await _admitted(second.url, key["secret"], 3) == 0
    finally:
        second.kill()


async def test_keys_made_by_a_budgeted_key_spend_its_budget_together(start_upstream: Any, tmp_path: Path) -> None:
    """An admin key held to $0.05 hands out two keys of $0.05 each: together they get five
    requests, not ten, and the sum holds after a restart too."""
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    first = await Served.start(path)
    try:
        boss = await _key(first.url, ADMIN, role="admin", budget_usd=0.05)
        one = await _key(first.url, boss["secret"], role="admin", budget_usd=0.05)
        two = await _key(first.url, boss["secret"], budget_usd=0.05)
        grandchild = await _key(first.url, one["secret"], budget_usd=0.05)
        assert one["parent"] == boss["id"] and grandchild["parent"] == one["id"]
        # A key manages itself and the keys below it only: not its parent, nor a sibling.
        for target in (boss, two):
            status, err = await call("POST", first.url + f"/admin/keys/{target['id']}/rotate", one["secret"], json={})
            assert status == 403 and "only itself and the keys below it" in err["error"]["message"], err
        status, _ = await call("PATCH", first.url + f"/admin/keys/{grandchild['id']}", one["secret"], json={"rpm": 5})
        assert status == 200
        assert await _admitted(first.url, one["secret"], 2) == 2
        assert await _admitted(first.url, grandchild["secret"], 1) == 1  # counts for one and boss
        assert await _admitted(first.url, two["secret"], 5) == 2
        assert await _admitted(first.url, boss["secret"], 1) == 0
        assert await _spent(first.url, boss["id"]) == 0.05
        assert await _spent(first.url, one["id"]) == 0.03
        assert await _spent(first.url, two["id"]) == 0.02
        # The operator raises the boss's budget: its keys spend again, each within its own.
        status, _ = await call("PATCH", first.url + f"/admin/keys/{boss['id']}", ADMIN, json={"budget_usd": 1})
        assert status == 200
        await eventually(lambda: _admitted(first.url, two["secret"], 1), "the raised budget", within=3)
        assert await _admitted(first.url, two["secret"], 5) == 2  # two's own $0.05 now binds
        await asyncio.sleep(0.4)
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        assert await _spent(second.url, boss["id"]) == 0.08  # read back from its keys' spend
        assert await _spent(second.url, two["id"]) == 0.05
        assert await _admitted(second.url, two["secret"], 2) == 0
        assert await _admitted(second.url, one["secret"], 3) == 2
    finally:
        second.kill()


async def test_a_budget_given_to_a_key_later_counts_its_month_so_far(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    served = await Served.start(path)
    try:
        key = await _key(served.url, ADMIN)
        assert await _admitted(served.url, key["secret"], 3) == 3
        status, _ = await call("PATCH", served.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": 0.05})
        assert status == 200  # this instance applies it before answering
        assert await _admitted(served.url, key["secret"], 1) == 1  # the first request seen with it

        async def month_so_far() -> bool:  # the key's counter, kept while it had no budget
            return await _spent(served.url, key["id"]) == 0.04

        await eventually(month_so_far, "the month's spend read back", within=10)
        assert await _admitted(served.url, key["secret"], 3) == 1
    finally:
        served.kill()


async def test_a_revoked_keys_budget_stays_listed_and_says_so(start_upstream: Any, tmp_path: Path) -> None:
    """`/admin/budgets` listed a revoked key's budget like a live one's: its spend is real and
    stays, but an operator reading it could not tell the key no longer works."""
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    served = await Served.start(path)
    try:
        maker = await _key(served.url, ADMIN, role="admin", budget_usd=1.0, name="ci-maker")
        made = await _key(served.url, maker["secret"], budget_usd=0.5)
        live = await _key(served.url, ADMIN, budget_usd=0.5)
        assert await _admitted(served.url, made["secret"], 2) == 2
        assert (await call("DELETE", served.url + f"/admin/keys/{maker['id']}", ADMIN))[0] == 200
        status, view = await call("GET", served.url + "/admin/budgets", ADMIN)
        assert status == 200, view
        rows = {b["name"]: b for b in view["budgets"]}
        assert rows[f"key:{maker['id']}"]["key_status"] == "revoked"
        assert rows[f"key:{maker['id']}"]["spent_usd"] == 0.02  # what the key it made spent
        assert rows[f"key:{made['id']}"]["key_status"] == "revoked"  # made by a revoked key
        assert rows[f"key:{made['id']}"]["spent_usd"] == 0.02
        assert rows[f"key:{maker['id']}"]["key_name"] == "ci-maker" and rows[f"key:{made['id']}"]["key_name"] is None
        assert rows[f"key:{live['id']}"]["key_status"] == "active"
    finally:
        served.kill()


async def test_a_managed_keys_rate_window_is_not_forgotten_across_a_hard_kill(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    first = await Served.start(path)
    try:
        key = await _key(first.url, ADMIN, rpm=3)
        assert await _admitted(first.url, key["secret"], 3) == 3
        await asyncio.sleep(0.4)
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        async with openai.AsyncOpenAI(base_url=second.url + "/v1", api_key=key["secret"], max_retries=0) as client:
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
                raise AssertionError("a fourth request within the minute was answered after the restart")
            except openai.RateLimitError as e:
                assert "rate limit" in str(e).lower(), e
    finally:
        second.kill()


async def test_two_instances_on_redis_hold_a_parent_budget_together(start_upstream: Any, tmp_path: Path) -> None:
    """Keys made by a budgeted key, used on two instances sharing Redis: five requests in all."""
    redis_url = require_redis()
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"kb-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    a, b = await Served.start(path), await Served.start(path)
    try:
        boss = await _key(a.url, ADMIN, role="admin", budget_usd=0.05)
        one = await _key(a.url, boss["secret"], budget_usd=0.05)
        two = await _key(a.url, boss["secret"], budget_usd=0.05)
        await eventually(lambda: _known(b.url, two["secret"]), "instance B knows the keys", within=5)
        assert await _admitted(a.url, one["secret"], 3) == 3
        assert await _admitted(b.url, two["secret"], 5) == 2
        assert await _admitted(a.url, two["secret"], 1) == 0
    finally:
        a.kill()
        b.kill()


async def _known(url: str, token: str) -> bool:
    status, _ = await call("GET", url + "/v1/models", token)
    return status == 200
