"""Budgets end to end: reservation under concurrency, block, downgrade, notify, virtual keys."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.config import ConfigError
from edgeroute.state import STATE
from tests.conftest import start_routes
from tests.test_cost_support import cost_proxy, one_deployment

# With max_tokens=5 and replies longer than that, the mock reports exactly 5 completion
# tokens: the actual cost equals the reserved estimate (input is free in these configs).
MAX_TOKENS = 5
COST = MAX_TOKENS * 2.0 / 1e6


def _keys() -> dict[str, Any]:
    return {
        "alice": {"token": "sk-alice-secret-token", "team": "research", "user": "alice"},
        "bob": {"token_sha256": hashlib.sha256(b"sk-bob-secret-token").hexdigest(), "team": "ops", "user": "bob"},
        "root": {"token": "sk-root-secret-token", "role": "admin"},
    }


def _rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM spend ORDER BY id")]
    finally:
        conn.close()


async def test_200_concurrent_requests_against_room_for_10(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=40, latency_ms=20)
    db = tmp_path / "spend.db"
    cfg = one_deployment(
        up.base_url,
        keys=_keys(),
        ledger={"path": str(db), "flush_interval": 0.2},
        budgets={"limits": [{"name": "team-day", "scope": "team", "match": "research", "limit_usd": COST * 10.5,
                             "period": "day"}]},
    )  # fmt: skip
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-alice-secret-token", max_retries=0)

        async def one(i: int) -> int:
            try:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=MAX_TOKENS
                )
                return 200
            except openai.RateLimitError as e:
                assert e.body is not None and e.body["code"] == "budget_exceeded"  # type: ignore[index]
                assert "team-day" in e.message and "resets at" in e.message
                assert e.response.headers["x-edgeroute-budget"] == "team-day"
                assert int(e.response.headers["retry-after"]) >= 1
                return 429

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
        await client.close()
    assert statuses.count(200) == 10
    assert statuses.count(429) == 190
    rows = _rows(db)  # the ledger was flushed when the app closed
    assert len(rows) == 200
    ok = [r for r in rows if r["outcome"] == "ok"]
    blocked = [r for r in rows if r["outcome"] == "blocked"]
    assert len(ok) == 10 and len(blocked) == 190
    assert all(r["admission"] == "blocked:team-day" and r["status"] == 429 for r in blocked)
    assert all(r["key_id"] == "alice" and r["team"] == "research" and r["user_id"] == "alice" for r in rows)
    assert sum(r["cost_usd"] for r in ok) == pytest.approx(COST * 10)
    assert sum(r["cost_usd"] for r in blocked) == 0
    # No token anywhere in the ledger.
    assert b"secret-token" not in db.read_bytes()


async def test_unknown_token_is_401_and_admin_needs_admin_role(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = one_deployment(up.base_url, keys=_keys(), ledger={"path": str(tmp_path / "l.db")})
    async with cost_proxy(cfg) as proxy:
        bad = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            await bad.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert "sk-nope" not in str(ei.value.body)
        await bad.close()
        bob = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-bob-secret-token", max_retries=0)
        r = await bob.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert r.choices
        await bob.close()
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.get(
                proxy.url + "/admin/spend", headers={"Authorization": "Bearer sk-bob-secret-token"}
            ) as resp:
                assert resp.status == 403
            async with s.get(
                proxy.url + "/admin/spend", headers={"Authorization": "Bearer sk-root-secret-token"}
            ) as resp:
                assert resp.status == 200
            async with s.get(proxy.url + "/healthz") as resp:
                assert resp.status == 200


async def test_downgrade_changes_the_route_then_block(start_upstream, tmp_path: Path) -> None:
    big = await start_upstream(reply_words=40, record=True)
    small = await start_upstream(reply_words=40, record=True)
    db = tmp_path / "spend.db"
    cfg = {
        "providers": {"big": {"base_url": big.base_url}, "small": {"base_url": small.base_url}},
        "deployments": {
            "d-big": {"provider": "big", "model": "gpt-4o", "price": {"input_per_mtok": 0, "output_per_mtok": 2.0}},
            "d-small": {
                "provider": "small",
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 0, "output_per_mtok": 0.2},
            },
        },
        "models": {"smart": {"deployments": ["d-big"]}, "cheap": {"deployments": ["d-small"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {
            "limits": [
                {
                    "name": "global-month",
                    "scope": "global",
                    "limit_usd": COST * 4,
                    "actions": [
                        {"at_percent": 50, "action": "downgrade", "to": "cheap"},
                        {"at_percent": 100, "action": "block"},
                    ],
                }
            ]
        },
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        routes = []
        for _ in range(2 + 20 + 5):
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="smart", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
                )
                routes.append(raw.headers["x-edgeroute-route"])
            except openai.RateLimitError:
                routes.append("blocked")
        await client.close()
    # $0.00001 each on smart: two reach 50%; then cheap costs a tenth: 20 more reach 100%.
    assert routes[:2] == ["smart", "smart"]
    assert routes[2:22] == ["cheap"] * 20
    assert routes[22:] == ["blocked"] * 5
    assert [r["body"]["model"] for r in small.options.requests] == ["gpt-4o-mini"] * 20
    rows = _rows(db)
    assert [r["route"] for r in rows[2:22]] == ["cheap"] * 20
    assert all(r["model"] == "smart" and r["admission"] == "downgraded:global-month" for r in rows[2:22])
    assert all(r["outcome"] == "blocked" for r in rows[22:])


async def test_notify_posts_a_webhook_once(start_upstream) -> None:
    up = await start_upstream(reply_words=40)
    events: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        events.append(orjson.loads(await request.read()))
        return web.Response()

    hook_server = await start_routes(web.post("/hook", hook))
    url = hook_server.url + "/hook"
    cfg = one_deployment(
        up.base_url,
        budgets={"limits": [{"name": "per-key", "scope": "key", "limit_usd": COST * 10, "period": "rolling",
                             "window_hours": 1, "actions": [{"at_percent": 30, "action": "notify", "webhook": url}]}]},
    )  # fmt: skip
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        for _ in range(6):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
            )
        await client.close()
    await hook_server.close()
    assert len(events) == 1
    e = events[0]
    assert e["budget"] == "per-key" and e["subject"] == "anonymous" and e["threshold_percent"] == 30
    assert e["used_usd"] == pytest.approx(COST * 3)


def test_budget_config_is_strict_and_checked() -> None:
    base = {"providers": {"a": {"base_url": "http://127.0.0.1:1"}},
            "deployments": {"d": {"provider": "a", "model": "gpt-4o", "price": "catalogue"}},
            "models": {"m": {"deployments": ["d"]}}}  # fmt: skip
    with pytest.raises(ConfigError) as ei:
        config_mod.parse({**base, "budgets": {"limits": [{"name": "b", "scope": "team", "limit_usd": 1, "bogus": 1}]}})
    assert "budgets.limits[0].bogus: unknown key" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(
            {**base, "budgets": {"limits": [{"name": "b", "scope": "global", "limit_usd": 1, "period": "rolling",
                                             "actions": [{"at_percent": 80, "action": "downgrade", "to": "nope"}]}]}}
        )  # fmt: skip
    msg = str(ei.value)
    assert "budgets.limits[0].window_hours" in msg and "budgets.limits[0].actions[0].to: unknown model 'nope'" in msg
    with pytest.raises(ConfigError) as ei:
        config_mod.parse({**base, "keys": {"k": {"team": "t"}}})
    assert "keys.k: give exactly one of token" in str(ei.value)


async def test_virtual_key_team_feeds_the_core_rules(start_upstream) -> None:
    a = await start_upstream(record=True)
    b = await start_upstream(record=True)
    cfg = {
        "providers": {"a": {"base_url": a.base_url}, "b": {"base_url": b.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o"}, "d-b": {"provider": "b", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d-a"]}, "m-team": {"deployments": ["d-b"]}},
        "rules": [{"name": "ops-team", "when": {"teams": ["ops"]}, "then": {"route": "m-team"}}],
        "keys": _keys(),
    }
    async with cost_proxy(cfg) as proxy:
        for token, route in (("sk-alice-secret-token", "m"), ("sk-bob-secret-token", "m-team")):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
            assert raw.headers["x-edgeroute-route"] == route
            await client.close()


def test_keys_and_server_api_keys_are_exclusive() -> None:
    cfg = one_deployment("http://127.0.0.1:1/v1", keys=_keys(), server={"api_keys": ["k"]})
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(cfg)
    assert "keys: use either keys" in str(ei.value)


def test_periods_calendar_and_rolling() -> None:
    import calendar

    from edgeroute.config import Budget
    from edgeroute.cost.budgets import ROLLING_SLOTS, LocalBudgetStore, period_of

    t = calendar.timegm((2026, 12, 31, 23, 30, 0))
    day = period_of(Budget(name="d", scope="global", limit_usd=1, period="day"), t)
    assert day.id == "2026-12-31" and day.resets_at == calendar.timegm((2027, 1, 1, 0, 0, 0))
    east = period_of(Budget(name="d", scope="global", limit_usd=1, period="day", utc_offset_minutes=60), t)
    assert east.id == "2027-01-01" and east.resets_at == calendar.timegm((2027, 1, 1, 23, 0, 0))
    month = period_of(Budget(name="m", scope="global", limit_usd=1, period="month"), t)
    assert month.id == "2026-12" and month.resets_at == calendar.timegm((2027, 1, 1, 0, 0, 0))
    b = Budget(name="r", scope="global", limit_usd=1, period="rolling", window_hours=1)
    store = LocalBudgetStore()
    from edgeroute.cost.budgets import charge

    first = period_of(b, t)
    store.reserve_now([charge(b, "*", first, 100, -1)])
    later = period_of(b, t + 3600 - 60)  # still inside the window
    assert store.used(charge(b, "*", later, 0, -1)) == 100
    gone = period_of(b, t + 3600 + 3600 / ROLLING_SLOTS)  # the first slot has left the window
    assert store.used(charge(b, "*", gone, 0, -1)) == 0


async def test_budgets_reserve_by_a_bound_and_count_exactly_only_when_it_refuses(start_upstream) -> None:
    # Exact BPE counting stays off the request path: a budget reserves by an upper bound of the
    # prompt's tokens. A request that the bound alone would refuse is counted exactly and fits.
    up = await start_upstream(reply_words=40)
    text = "budget " * 600
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
    cfg = one_deployment(up.base_url)
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    async with cost_proxy(cfg) as probe:
        exact = probe.app[STATE].live.router.count_prompt(orjson.dumps(body))
    exact_cost = (exact * 1.0 + MAX_TOKENS * 2.0) / 1e6
    cfg["budgets"] = {"limits": [{"name": "g", "scope": "global", "limit_usd": exact_cost * 1.5, "period": "day"}]}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(**body)  # type: ignore[call-overload]
        # Admitted (the exact count fits; the bound, about four times it, would not), and the
        # decision itself did not count: its header gives the estimate.
        assert raw.http_response.status_code == 200
        assert raw.headers["x-edgeroute-prompt-tokens"].startswith("~")
        small = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
        )
        assert small.headers["x-edgeroute-prompt-tokens"].startswith("~")
        with pytest.raises(openai.RateLimitError) as e:  # the budget is spent now, exactly counted or not
            await client.chat.completions.create(**body)
        assert e.value.code == "budget_exceeded"


def test_the_local_store_forgets_the_counters_of_ended_periods_and_only_those() -> None:
    # Every key's (team's, user's) counter of every day would otherwise stay for as long as the
    # process runs: memory that grows for days.
    from edgeroute.config import Budget
    from edgeroute.cost.budgets import ROLLING_SLOTS, SWEEP_MOST, LocalBudgetStore, charge, period_of

    # The tenth of next month: every period here ends after the real clock, which the store's
    # own sweeps go by, and the day's end is mid-month.
    year, month_no = time.gmtime().tm_year, time.gmtime().tm_mon
    now = float(calendar.timegm((year + month_no // 12, month_no % 12 + 1, 10, 12, 0, 0)))
    day = Budget(name="d", scope="key", limit_usd=1, period="day")
    month = Budget(name="m", scope="key", limit_usd=1, period="month")
    rolling = Budget(name="r", scope="key", limit_usd=1, period="rolling", window_hours=1)
    store = LocalBudgetStore()
    today, this_month, slot = period_of(day, now), period_of(month, now), period_of(rolling, now)
    subjects = [f"k{i}" for i in range(SWEEP_MOST + 500)]
    store.reserve_now([charge(day, s, today, 5, -1) for s in subjects])
    store.reserve_now([charge(month, "k0", this_month, 7, -1), charge(rolling, "k0", slot, 9, -1)])
    store.add_read_back(f"d:read-back:{today.id}", 11)  # at start, from the ledger: known by name
    assert store.sweep(now) == 0  # nothing has ended

    # The day has ended (an hour past, whatever its UTC offset): its counters go, a few
    # thousand per sweep; the month's stays, and so does the rolling counter charged again.
    later = today.resets_at + 15 * 3600
    store.reserve_now([charge(rolling, "k0", period_of(rolling, later), 1, -1)])
    dropped = store.sweep(later) + store.sweep(later)
    assert dropped == len(subjects) + 1
    left = store.counters()
    assert not any(k.startswith("d:") for k in left)
    assert left[f"m:k0:{this_month.id}"] == 7
    assert store.used(charge(rolling, "k0", period_of(rolling, later), 0, -1)) == 1
    assert store.used(charge(month, "k0", period_of(month, later), 0, -1)) == 7

    # Past the rolling window of its last charge and the month's end, nothing is left.
    end = max(this_month.resets_at, (period_of(rolling, later).slot + ROLLING_SLOTS + 1) * slot.slot_s) + 15 * 3600
    store.sweep(end)
    assert store.counters() == {}
