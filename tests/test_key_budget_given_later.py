"""A budget given to a managed key later, or taken off and given back, counts the whole month:
requests still running when it was given, spend while it was off, spend another instance
served before it saw the budget, across a hard kill and a Redis that restarted empty. (A key's
monthly spend is counted whether or not it has a budget: `cost.keys.key_counter`. It was read
back from the ledger once, when the budget was first seen: the running requests were not in
the ledger yet, and the spend while a budget was off was never read.) Real `edgeroute serve`
processes, the openai SDK as client, $0.01 a request; alone, and two instances on real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import eventually
from tests.governance_support import call
from tests.test_cost_restart import Served
from tests.test_cost_support import RedisServer, require_redis
from tests.test_key_budgets import ADMIN, _admitted, _config, _key, _spent


async def _patch(url: str, key_id: str, budget: float | None) -> None:
    status, body = await call("PATCH", url + f"/admin/keys/{key_id}", ADMIN, json={"budget_usd": budget})
    assert status == 200, body


async def test_requests_running_when_a_key_gets_a_budget_count_against_it(start_upstream: Any, tmp_path: Path) -> None:
    """Three requests of 1.5 s are running when the key is given $0.05: with them and the
    first request seen with the budget, one more fits, not four. (The ledger is read as the
    budget is first seen, before the three are written; a reloaded config budget waits for
    the previous generation's requests instead, `state.retiring`.)"""
    up = await start_upstream(latency_ms=1500)
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        key = await _key(served.url, ADMIN)
        running = asyncio.gather(*(_admitted(served.url, key["secret"], 1) for _ in range(3)))
        await asyncio.sleep(0.2)  # admitted, without a budget
        await _patch(served.url, key["id"], 0.05)
        await asyncio.sleep(0.5)  # the key poll sees it
        assert await _admitted(served.url, key["secret"], 1) == 1  # the budget first seen
        assert sum(await running) == 3
        await asyncio.sleep(0.5)  # all written to the ledger
        assert await _admitted(served.url, key["secret"], 4) == 1, "the requests running at the change were not counted"
    finally:
        served.kill()


async def test_a_budget_taken_off_and_given_back_counts_the_spend_in_between(
    start_upstream: Any, tmp_path: Path
) -> None:
    """$0.05, one request; the budget taken off, three more; $0.05 again: the month so far is
    $0.04 as when a budget is first given (test_key_budgets.py), so one more fits, not four."""
    up = await start_upstream()
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        key = await _key(served.url, ADMIN, budget_usd=0.05)
        assert await _admitted(served.url, key["secret"], 1) == 1
        await _patch(served.url, key["id"], None)
        await asyncio.sleep(0.5)
        assert await _admitted(served.url, key["secret"], 3) == 3
        await asyncio.sleep(0.3)
        await _patch(served.url, key["id"], 0.05)
        await asyncio.sleep(0.5)
        assert await _admitted(served.url, key["secret"], 1) == 1
        await asyncio.sleep(0.3)
        assert await _admitted(served.url, key["secret"], 4) == 0, "the $0.03 spent without the budget was forgotten"
    finally:
        served.kill()


async def test_toggling_a_budget_off_and_on_again_never_resets_it(start_upstream: Any, tmp_path: Path) -> None:
    """Whoever may change a key's budget takes it off around each burst and puts it back: the
    bursts still count. $0.05; two requests; twice: off, two more, on again; $0.06 is spent, so
    nothing more fits (the budget saw only its first $0.02 and let three more through)."""
    up = await start_upstream()
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        key = await _key(served.url, ADMIN, budget_usd=0.05)
        assert await _admitted(served.url, key["secret"], 2) == 2
        for _ in range(2):
            await _patch(served.url, key["id"], None)  # this instance applies it before answering
            assert await _admitted(served.url, key["secret"], 2) == 2
            await _patch(served.url, key["id"], 0.05)
        assert await _spent(served.url, key["id"]) == 0.06
        assert await _admitted(served.url, key["secret"], 3) == 0, "spend while the budget was off escaped it"
    finally:
        served.kill()


async def test_spend_without_a_budget_counts_after_a_hard_kill(start_upstream: Any, tmp_path: Path) -> None:
    """A key without a budget spends $0.03; the server is killed hard and started again; given
    $0.05, the key gets two more requests: its counter is read back at start with everyone's."""
    up = await start_upstream()
    path = _config(up.base_url, tmp_path)
    first = await Served.start(path)
    try:
        key = await _key(first.url, ADMIN)
        assert await _admitted(first.url, key["secret"], 3) == 3
        await asyncio.sleep(0.4)  # past one ledger flush interval (what a crash can lose)
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        await _patch(second.url, key["id"], 0.05)
        assert await _spent(second.url, key["id"]) == 0.03
        assert await _admitted(second.url, key["secret"], 4) == 2
    finally:
        second.kill()


def _on_redis(path: Path, redis_url: str) -> Path:
    cfg = yaml.safe_load(path.read_text())
    cfg["shared_state"] = {"redis_url": redis_url, "prefix": f"kl-{uuid.uuid4().hex[:8]}", "on_unavailable": "closed"}
    path.write_text(yaml.safe_dump(cfg))
    return path


async def _sees_budget(url: str, key_id: str, present: bool) -> bool:
    """Whether the instance at `url` has seen the key's budget given (or taken off)."""
    status, view = await call("GET", url + "/admin/budgets", ADMIN)
    assert status == 200, view
    return any(b["name"] == f"key:{key_id}" for b in view["budgets"]) == present


async def test_on_redis_requests_another_instance_runs_when_a_key_gets_a_budget_count(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Two instances on Redis: three requests of 1.5 s run on B, admitted without a budget,
    when A gives the key $0.05: with A's own first request they leave room for one more."""
    redis_url = require_redis()
    up = await start_upstream(latency_ms=1500)
    path = _on_redis(_config(up.base_url, tmp_path), redis_url)
    a, b = await Served.start(path), await Served.start(path)
    try:
        key = await _key(a.url, ADMIN)
        await eventually(lambda: _known(b.url, key["secret"]), "instance B knows the key", within=5)
        running = asyncio.gather(*(_admitted(b.url, key["secret"], 1) for _ in range(3)))
        await asyncio.sleep(0.2)  # admitted by B, without a budget
        await _patch(a.url, key["id"], 0.05)
        assert await _admitted(a.url, key["secret"], 1) == 1
        assert sum(await running) == 3
        await eventually(lambda: _sees_budget(b.url, key["id"], True), "instance B sees the budget", within=5)
        await eventually(lambda: _spent_is(a.url, key["id"], 0.04), "B's requests counted as they end", within=5)
        assert await _admitted(b.url, key["secret"], 4) == 1, "the requests B ran at the change were not counted"
        assert await _admitted(a.url, key["secret"], 1) == 0
    finally:
        a.kill()
        b.kill()


async def test_on_redis_a_budget_toggled_on_one_instance_counts_what_another_served(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A takes the key's $0.05 off and gives it back; B served $0.03 in between, unbudgeted as
    far as it knew: on either instance one more request fits, not four."""
    redis_url = require_redis()
    up = await start_upstream()
    path = _on_redis(_config(up.base_url, tmp_path), redis_url)
    a, b = await Served.start(path), await Served.start(path)
    try:
        key = await _key(a.url, ADMIN, budget_usd=0.05)
        await eventually(lambda: _sees_budget(b.url, key["id"], True), "instance B knows the key", within=5)
        assert await _admitted(a.url, key["secret"], 1) == 1
        await _patch(a.url, key["id"], None)
        await eventually(lambda: _sees_budget(b.url, key["id"], False), "B sees the budget off", within=5)
        assert await _admitted(b.url, key["secret"], 3) == 3
        await _patch(a.url, key["id"], 0.05)
        await eventually(lambda: _sees_budget(b.url, key["id"], True), "B sees the budget back", within=5)
        await eventually(lambda: _spent_is(a.url, key["id"], 0.04), "B's requests counted as they end", within=5)
        assert await _admitted(b.url, key["secret"], 1) == 1
        assert await _admitted(a.url, key["secret"], 4) == 0, "the $0.03 B served without the budget escaped it"
        assert await _spent(a.url, key["id"]) == 0.05
    finally:
        a.kill()
        b.kill()


async def test_on_redis_restarted_empty_spend_without_a_budget_is_read_back(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A key without a budget spends $0.03; Redis restarts empty; one more request (its cost
    reaches no counter: Redis holds no budgets); given $0.05, the key gets one more, not four:
    the read-back into Redis counts every key's month, budgeted or not."""
    up = await start_upstream()
    redis = RedisServer(tmp_path)
    redis.start()
    served = None
    try:
        served = await Served.start(_on_redis(_config(up.base_url, tmp_path), redis.url))
        key = await _key(served.url, ADMIN)
        assert await _admitted(served.url, key["secret"], 3) == 3
        redis.stop()  # killed: it had no persistence, so it comes back empty
        redis.start()
        assert await _admitted(served.url, key["secret"], 1) == 1
        await _patch(served.url, key["id"], 0.05)
        assert await _admitted(served.url, key["secret"], 4) == 1
        assert await _spent(served.url, key["id"]) == 0.05
    finally:
        if served is not None:
            served.kill()
        redis.stop()


async def _spent_is(url: str, key_id: str, usd: float) -> bool:
    return await _spent(url, key_id) == usd


async def _known(url: str, token: str) -> bool:
    status, _ = await call("GET", url + "/v1/models", token)
    return status == 200


async def test_counting_keys_without_a_budget_costs_no_redis_script_per_request(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A managed key without a budget or limits: its requests' counts reach Redis in batches
    (one script a tenth of a second at most), not one script per request; and they are there
    (given $0.50, the key has $0.30 of it spent). A private Redis: its command counts are ours."""
    import redis as redis_py

    up = await start_upstream()
    redis = RedisServer(tmp_path)
    redis.start()
    served = None
    try:
        served = await Served.start(_on_redis(_config(up.base_url, tmp_path), redis.url))
        key = await _key(served.url, ADMIN)
        client = redis_py.Redis.from_url(redis.url)

        def scripts() -> int:
            stats = client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("eval", "evalsha"))

        before = scripts()
        assert await _admitted(served.url, key["secret"], 30) == 30
        await _patch(served.url, key["id"], 0.5)

        async def all_counted() -> bool:  # the last batch goes within 0.1 s
            return await _spent(served.url, key["id"]) == 0.3

        await eventually(all_counted, "the 30 requests counted", within=5)
        ran = scripts() - before
        assert ran < 15, f"{ran} Redis scripts for 30 requests"
        client.close()
    finally:
        if served is not None:
            served.kill()
        redis.stop()


async def test_a_redis_seeded_by_an_earlier_release_is_seeded_again_with_every_keys_month(
    start_upstream: Any, tmp_path: Path
) -> None:
    """An earlier release seeded Redis with budgeted keys' counters only (its marker
    `budgets-seeded`): an upgraded instance reads every key's month into it at start, keeping
    the counters it has. A key without a budget spent $0.03 before the upgrade; given $0.05
    after it, two more requests fit, not five."""
    redis_url = require_redis()
    up = await start_upstream()
    path = _on_redis(_config(up.base_url, tmp_path), redis_url)
    prefix = yaml.safe_load(path.read_text())["shared_state"]["prefix"]
    first = await Served.start(path)
    try:
        key = await _key(first.url, ADMIN)
        assert await _admitted(first.url, key["secret"], 3) == 3
        await asyncio.sleep(0.4)  # past one ledger flush interval, and the counts' batch
    finally:
        first.kill()
    import redis as redis_py

    with redis_py.Redis.from_url(redis_url) as client:  # Redis as the earlier release left it
        assert client.delete(*client.keys(f"{prefix}:b:key:*")) == 1
        client.rename(f"{prefix}:budgets-seeded:3", f"{prefix}:budgets-seeded")
    second = await Served.start(path)
    try:
        await _patch(second.url, key["id"], 0.05)
        assert await _spent(second.url, key["id"]) == 0.03
        assert await _admitted(second.url, key["secret"], 5) == 2
    finally:
        second.kill()
