"""Ways a managed key's spend could escape a budget: a chain deeper than the ancestors
followed, a key brought within scope by PATCH and then rotated, a budget given later on a
shared store. Real `edgeroute serve` processes, real Redis, the openai SDK, $0.01 a request."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.governance_support import call
from tests.test_cost_restart import Served
from tests.test_cost_support import require_redis
from tests.test_key_budgets import ADMIN, _admitted, _config, _key, _known


async def test_a_chain_of_keys_is_bounded_and_its_deepest_key_spends_within_the_root_budget(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A key held to $0.05 builds a chain of keys under it: the chain stops at MAX_DEPTH levels
    (a 403 that says so: each level adds a budget to every request), and its deepest key, with
    its own $0.05 as check_scope demands, spends nothing once the root's budget is gone. (It
    spent three more requests when the ancestors followed stopped at 32 and chains did not.)"""
    from edgeroute.governance.keys import MAX_DEPTH

    up = await start_upstream()
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        root = await _key(served.url, ADMIN, role="admin", budget_usd=0.05)
        assert await _admitted(served.url, root["secret"], 6) == 5  # the root's budget is spent
        holder, depth = root, 1
        while True:
            status, made = await call(
                "POST", served.url + "/admin/keys", holder["secret"], json={"role": "admin", "budget_usd": 0.05}
            )
            if status != 201:
                break
            holder, depth = made, depth + 1
        assert (status, depth) == (403, MAX_DEPTH) and "levels" in made["error"]["message"], made
        # The root's $0.05 is gone: no key below it may spend a cent more.
        assert await _admitted(served.url, holder["secret"], 3) == 0, "a deep key spent past its root's budget"
    finally:
        served.kill()


async def test_a_budget_given_later_on_redis_counts_the_month_so_far(start_upstream: Any, tmp_path: Path) -> None:
    """With Redis up, admission reads Redis: a key that spent $0.03 then given $0.05 gets two
    more requests, not five. (The month so far was once read back into the in-process counters
    only, and Redis's new counter started at 0; now Redis counts the key's month all along.)"""
    redis_url = require_redis()
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"rv-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)
    try:
        key = await _key(served.url, ADMIN)
        assert await _admitted(served.url, key["secret"], 3) == 3
        await asyncio.sleep(0.4)  # written to the ledger
        status, _ = await call("PATCH", served.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": 0.05})
        assert status == 200
        await asyncio.sleep(0.5)  # the key poll sees the change
        assert await _admitted(served.url, key["secret"], 1) == 1  # the first request seen with it
        await asyncio.sleep(0.5)  # the month so far, read back in the background
        assert await _admitted(served.url, key["secret"], 5) == 1, "the $0.03 spent before the budget was forgotten"
    finally:
        served.kill()


async def test_a_budget_given_later_on_a_second_instance_counts_the_month_so_far(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The same on two instances sharing Redis, whichever instance serves the key."""
    redis_url = require_redis()
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"rv-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    a, b = await Served.start(path), await Served.start(path)
    try:
        key = await _key(a.url, ADMIN)
        assert await _admitted(a.url, key["secret"], 3) == 3
        await asyncio.sleep(0.4)
        status, _ = await call("PATCH", a.url + f"/admin/keys/{key['id']}", ADMIN, json={"budget_usd": 0.05})
        assert status == 200
        await asyncio.sleep(0.6)
        assert await _known(b.url, key["secret"])
        assert await _admitted(b.url, key["secret"], 1) == 1
        await asyncio.sleep(0.5)
        assert await _admitted(b.url, key["secret"], 5) == 1, "the $0.03 spent before the budget was forgotten"
    finally:
        a.kill()
        b.kill()


async def test_a_budgeted_key_cannot_take_over_a_key_outside_its_budget(start_upstream: Any, tmp_path: Path) -> None:
    """PATCH checks only the key's new fields against the caller's scope, not the key it
    changes (revoke and rotate check `_within_scope`): a key held to $0.05 PATCHes the
    operator's unbudgeted key down to $0.05, which brings it within its scope, rotates it and
    holds its secret. That key has no parent: its spend is outside the $0.05 — and it was
    another holder's key."""
    up = await start_upstream()
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        boss = await _key(served.url, ADMIN, role="admin", budget_usd=0.05)
        other = await _key(served.url, ADMIN, role="admin")  # the operator's, for someone else
        assert await _admitted(served.url, boss["secret"], 6) == 5  # the boss's budget is spent
        status, _ = await call(
            "PATCH", served.url + f"/admin/keys/{other['id']}", boss["secret"], json={"budget_usd": 0.05}
        )
        if status == 200:
            status, taken = await call(
                "POST", served.url + f"/admin/keys/{other['id']}/rotate", boss["secret"], json={}
            )
            if status == 200:
                spent = await _admitted(served.url, taken["secret"], 3)
                raise AssertionError(f"a $0.05 key took over an unrelated key and spent {spent} more requests")
        assert status == 403
    finally:
        served.kill()
