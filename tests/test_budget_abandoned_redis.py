"""A client that hangs up while its budget reservation waits on the shared store takes nothing
from the budget (red3M F1): the store made the reservation whatever the handler did, and with
no ticket holding it, it counted as spent until the period ended. Here Redis, for the
reservation on a `downgrade` action's target (the admission script gives its own back);
`tests/scale/test_budget_abandoned_workers.py` has the workers' file."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.cost import budgets as B
from edgeroute.cost.redis_store import RedisState
from tests.conftest import eventually
from tests.test_cost_support import cost_proxy, require_redis

ROOT, ALICE = "root-token-abandon-aaaaaaaaaaaa", "alice-token-abandon-bbbbbbbbbbbb"
RESERVATION_USD = 0.2  # max_tokens 200 at $1,000 per million output tokens (input is free)


def budget_config(base_url: str, ledger: Path, **extra: Any) -> dict[str, Any]:
    """Key alice's $1 a day: five reservations of `RESERVATION_USD`."""
    price = {"input_per_mtok": 0, "output_per_mtok": 1000}
    return {
        "providers": {"a": {"base_url": base_url, "api_key": "key-a"}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": price}},
        "models": {"m": {"deployments": ["d-a"]}, "cheap": {"deployments": ["d-a"]}},
        "keys": {"root": {"token": ROOT, "role": "admin"}, "alice": {"token": ALICE, "team": "ta"}},
        "budgets": {"limits": [{"name": "alice-day", "scope": "key", "match": "alice", "limit_usd": 1.0}]},
        "ledger": {"backend": "sqlite", "path": str(ledger), "flush_interval": 0.1},
        **extra,
    }


async def abandon(url: str, n: int, after_s: float) -> None:
    """`n` streamed requests at once, each dropped by its client after `after_s`."""

    async def one() -> None:
        timeout = aiohttp.ClientTimeout(total=after_s)
        body = {"model": "m", "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {ALICE}"}
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.post(url + "/v1/chat/completions", json=body, headers=headers) as r,
            ):
                await r.read()
        except TimeoutError:
            return
        raise AssertionError("the request was answered before its client left")

    await asyncio.gather(*(one() for _ in range(n)))


async def budget_counted(url: str) -> float:
    """What `/admin/budgets` counts against alice's budget: spent and reserved."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {ROOT}"}) as r,
    ):
        assert r.status == 200, await r.text()
        (b,) = [b for b in (await r.json())["budgets"] if b["name"] == "alice-day"]
    return float(b["spent_usd"]) + float(b["reserved_usd"])


def ledger_spend(ledger: Path) -> float:
    with sqlite3.connect(ledger) as db:
        return float(db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM requests").fetchone()[0])


async def admitted(url: str, n: int) -> list[int]:
    """The statuses of `n` small requests (max_tokens 200, each well within the budget alone)."""
    out = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0) as c:
        for _ in range(n):
            try:
                await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=200)
                out.append(200)
            except openai.APIStatusError as e:
                out.append(e.status_code)
    return out


async def counter_follows_ledger(url: str, ledger: Path) -> float:
    """What the budget counts, once it is what the ledger holds (within half a reservation)."""
    seen: list[tuple[float, float]] = []

    async def settled() -> bool:
        seen.append((await budget_counted(url), ledger_spend(ledger)))
        return abs(seen[-1][0] - seen[-1][1]) < RESERVATION_USD / 2

    try:
        await eventually(settled, "the budget counting what the ledger holds", within=5)
    except AssertionError:
        raise AssertionError(f"budget counted, ledger spent: {seen[-1]}") from None
    return seen[-1][0]


async def test_redis_gives_back_a_downgrade_targets_reservation_whose_client_left(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"edgeroute-test-abandon-{os.getpid()}-{os.urandom(4).hex()}"
    shared = {"redis_url": require_redis(), "prefix": prefix}
    # Team ta's budget downgrades every request once it has spent anything (0.001 % of $100).
    downgrade = {"at_percent": 0.001, "action": "downgrade", "to": "cheap"}
    team = {"name": "team-dg", "scope": "team", "match": "ta", "limit_usd": 100.0, "actions": [downgrade]}
    up = await start_upstream(reply_words=5)
    ledger = tmp_path / "ledger.db"
    cfg = budget_config(up.base_url, ledger, shared_state=shared)
    cfg["budgets"]["limits"].append(team)
    async with cost_proxy(cfg) as proxy:
        assert await admitted(proxy.url, 1) == [200]  # the team has spent: every request is downgraded now
        real = RedisState.reserve

        async def answered_late(self: RedisState, charges: list[B.Charge], now: float) -> B.Reserved:
            got = await real(self, charges, now)
            await asyncio.sleep(0.5)  # reserved; Redis's answer on its way
            return got

        monkeypatch.setattr(RedisState, "reserve", answered_late)
        await abandon(proxy.url, 8, after_s=0.25)
        await asyncio.sleep(0.5)  # the store's answers come
        monkeypatch.setattr(RedisState, "reserve", real)
        counted = await counter_follows_ledger(proxy.url, ledger)
        assert counted < RESERVATION_USD, counted  # the first request's few cents
        assert await admitted(proxy.url, 4) == [200] * 4
