"""The local budget store forgets the counters of ended periods, and only those: for every period
kind and UTC offset a budget may have, read back by name at start or charged live; however few
requests follow an end; with a new subject each request for days; with a request admitted before
an end and settled after it; with the clock stepping back. Time is the store's own `clock`,
driven by the test (simulated days, no sleeping)."""

from __future__ import annotations

import asyncio
import calendar
import math
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.admission import ADMISSION
from edgeroute.config import Budget, parse
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend
from tests.conftest import eventually
from tests.test_cost_budgets import _rows
from tests.test_cost_support import cost_proxy, one_deployment

START = float(calendar.timegm((2027, 2, 26, 21, 17, 0)))  # days before a month's end (not a leap year)


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _budget(period: str, offset: int = 0, window: float | None = None, name: str = "b") -> Budget:
    return Budget(name=name, scope="user", limit_usd=1, period=period, window_hours=window, utc_offset_minutes=offset)  # type: ignore[arg-type]


def _charge(b: Budget, subject: str, now: float, amount: int = 5) -> B.Charge:
    return B.charge(b, subject, B.period_of(b, now), amount, -1)


def test_a_counter_read_back_by_name_ends_no_earlier_than_its_period_and_at_most_a_day_later() -> None:
    # At start the ledger gives names only (`_end_of_key`): a day's or month's UTC offset is
    # unknown there, and a rolling slot's size is rounded down in the name.
    offsets = [-840, -721, -330, -1, 0, 1, 345, 599, 840]
    windows = [1 / 120, 0.5, 1, 1.0001, 24, 24 * 366]
    times = [
        float(calendar.timegm(t))
        for t in [
            (2027, 2, 28, 23, 59, 59),
            (2028, 2, 29, 0, 0, 0),
            (2028, 2, 29, 13, 59, 59),
            (2026, 12, 31, 10, 0, 0),
            (2026, 12, 31, 23, 59, 59),
            (2027, 1, 1, 0, 0, 0),
            (2027, 7, 31, 14, 0, 0),
        ]
    ]
    for now in times:
        for t in (now, now + 0.5, now - 13 * 3600):
            for b in [_budget(p, o) for p in ("day", "month") for o in offsets]:
                p = B.period_of(b, t)
                assert p.starts_at <= t < p.resets_at
                named = B._end_of_key(f"{b.name}:u:{p.id}", -1, t)
                assert B.counter_end(p) <= named <= B.counter_end(p) + 28 * 3600, (b, t)
            for w in windows:
                b = _budget("rolling", window=w)
                p = B.period_of(b, t)
                named = B._end_of_key(f"{b.name}:u:{p.id}", p.slot, t)
                assert p.first_slot <= p.slot and B.counter_end(p) > t
                # At most a day later (what the clock may be behind the ledger): the slot's
                # number times the larger size alone was a year late for slots of a minute.
                assert B.counter_end(p) <= named <= B.counter_end(p) + B.READ_AHEAD_S + 61 * 3600 * w, (w, t)
                ahead = B.period_of(b, t + B.READ_AHEAD_S)  # the clock moved back: still counted
                assert B.counter_end(ahead) <= B._end_of_key(f"{b.name}:u:{p.id}", ahead.slot, t)
    # A name it cannot read is kept, whenever the sweep comes.
    clock = Clock()
    store = B.LocalBudgetStore(clock)
    for name in ["b:u:", "b:u:2027-13", "b:u:2027-02-30x", "b:u:r60", "b:u:week-9", "nocolon"]:
        store.add_read_back(name, 7)
        assert B._end_of_key(name, -1, START) == math.inf
    store.sweep(START + 10 * 366 * 86400)
    assert store.counters() == dict.fromkeys(
        ["b:u:", "b:u:2027-13", "b:u:2027-02-30x", "b:u:r60", "b:u:week-9", "nocolon"], 7
    )


def test_ended_counters_go_within_hours_however_few_requests_follow() -> None:
    # A day with many users, then days with three steady ones: each ended counter was looked at
    # only when a counter began (three a day), 2,000 at a time: 100,000 took 50 days to go.
    day = _budget("day")
    first_day = B.period_of(day, START)
    clock = Clock(first_day.starts_at)
    store = B.LocalBudgetStore(clock)
    for i in range(20_000):
        clock.now += 4
        store.reserve_now([_charge(day, f"one-off-{i}", clock.now)])
    assert sum(k.endswith(first_day.id) for k in store.counters()) == 20_000
    clock.now = first_day.resets_at
    for _ in range(4 * 60):  # four hours of the next day, three users once a minute
        clock.now += 60
        for u in range(3):
            store.reserve_now([_charge(day, f"steady-{u}", clock.now)])
    assert sorted(store.counters()) == [f"b:steady-{u}:{B.period_of(day, clock.now).id}" for u in range(3)]


def test_memory_stays_bounded_with_a_new_subject_every_request_over_simulated_days() -> None:
    # A day, a month and a rolling hour per user, a new user each request (every minute) for 40
    # days, across a month's end: what is kept is what the live periods still count.
    clock = Clock()
    store = B.LocalBudgetStore(clock)
    day, month, hour = (
        _budget("day", 330, name="d"),
        _budget("month", -60, name="m"),
        _budget("rolling", window=1, name="r"),
    )
    most = 0
    for i in range(40 * 1440):
        clock.now += 60
        store.reserve_now([_charge(b, f"u{i}", clock.now) for b in (day, month, hour)])
        if i % 1440 == 0:
            kept = store.counters()
            most = max(most, len(kept))
            # Every counter kept counts in a live period, or one ended in the last two hours.
            live = {B.period_of(b, t).id for b in (day, month) for t in (clock.now, clock.now - 2 * 3600)}
            for key in kept:
                name, user, pid = key.split(":")
                assert pid in live if name != "r" else int(user[1:]) >= i - 3 * 60, key
    # A month's users (1,440 a day), a day's and an hour's, and those of the hours before a sweep.
    assert 28 * 1440 < most <= 31 * 1440 + 2 * 1440 + 3 * 60
    assert len(store._ends) == len(store.counters())
    assert len(store._order) <= 2 * len(store.counters())  # the follow loop's turns: dropped ones go too
    assert sum(len(v) for v in store._ending.values()) <= 3 * len(store._ends)


def test_a_sweep_looks_at_a_bounded_number_of_entries_with_many_busy_rolling_keys() -> None:
    # A rolling key charged on is filed under each later hour; a sweep went through every stale
    # entry of an hour at once (35 ms on the event loop per 100,000 busy keys, dropping none).
    midnight = float(calendar.timegm((2027, 3, 1, 0, 0, 0)))
    clock = Clock(midnight)
    store = B.LocalBudgetStore(clock)
    hour = _budget("rolling", window=1)
    keys = 3 * B.SWEEP_MOST
    for minute in (0, 61):  # every key at midnight, filed under 01:00; again at 01:01, under 02:00
        for i in range(keys):
            clock.now = midnight + minute * 60 + i * 50 / keys
            store.reserve_now([_charge(hour, f"k{i}", clock.now)])
    for at in range(1, 6):  # past 02:00, the first hour's entries are all stale: every key is live
        before = sum(len(v) for v in store._ending.values())
        assert store.sweep(midnight + 2 * 3600 + at) == 0
        assert before - sum(len(v) for v in store._ending.values()) <= B.SWEEP_MOST
    assert sum(len(v) for v in store._ending.values()) == keys
    assert len(store.counters()) == keys


def test_a_request_admitted_before_its_period_ends_and_settled_after_a_suspend() -> None:
    # Reserved at the day's last second; the machine sleeps a day and two hours; the first
    # charge after it sweeps the ended day; the request settles into the period it was admitted
    # in: the new day counts none of it, and the old day's counter goes again.
    clock = Clock()
    store = B.LocalBudgetStore(clock)
    day = _budget("day", 90)
    ending = B.period_of(day, START)
    clock.now = ending.resets_at - 1
    held = [_charge(day, "u", clock.now, 100)]
    assert store.reserve_now(held).ok
    pending_elsewhere = [_charge(_budget("month", name="m"), "u", clock.now, 100)]
    assert store.reserve_now(pending_elsewhere).ok
    clock.now += 26 * 3600
    store.reserve_now([_charge(day, "other", clock.now, 1)])
    assert f"b:u:{ending.id}" not in store.counters()
    store.adjust(held, [40 - 100])  # settled at 40
    today = _charge(day, "u", clock.now, 0)
    assert store.used(today) == 0
    clock.now += 2 * 3600
    store.reserve_now([_charge(day, "other", clock.now, 1)])
    assert f"b:u:{ending.id}" not in store.counters()
    # A reservation whose period is live stays through every sweep until it settles.
    for k in range(48):
        store.sweep(clock.now + k * 60)
    assert store.used(pending_elsewhere[0]) == 100
    store.adjust(pending_elsewhere, [-60])
    assert store.used(pending_elsewhere[0]) == 40


def test_after_the_clock_steps_back_sweeps_go_on_and_drop_nothing_live() -> None:
    clock = Clock()
    store = B.LocalBudgetStore(clock)
    day = _budget("day")
    ended = B.period_of(day, START)
    store.reserve_now([_charge(day, "old", START)])
    clock.now = ended.resets_at + 3 * 3600
    store.reserve_now([_charge(day, "live", clock.now)])
    assert store.sweep(clock.now) == 0  # swept at the first charge
    assert list(store.counters()) == [f"b:live:{B.period_of(day, clock.now).id}"]
    clock.now -= 2 * 86400  # an NTP step, a VM restored: sweeps go by the clock as it is now
    for i in range(10):
        store.reserve_now([_charge(day, f"back{i}", clock.now)])
    clock.now += 86400 + 2 * 3600  # past the day it stepped back into: those go (the sweeps waited
    # for the clock to come back where it was), the live day stays
    store.reserve_now([_charge(day, "later", clock.now)])
    left = sorted(store.counters())
    assert not any(k.startswith("b:back") for k in left) and any(k.startswith("b:live") for k in left)


def test_counters_read_back_at_a_restart_stay_while_their_periods_are_live_then_go(tmp_path: Path) -> None:
    # The real ledger and read-back, for a day at both ends of the offsets, a month and two
    # rolling windows, with spend of ended periods in the ledger too and a request in flight
    # at the crash: the store counts what it read until each period's true end (names only:
    # the offsets and slot sizes are unknown to it), and nothing of it a day and more after
    # (a rolling window's counters read back stayed a year and more).
    budgets = [
        _budget("day", -840, name="day-west"),
        _budget("day", 840, name="day-east"),
        _budget("month", 330, name="month"),
        _budget("rolling", window=1, name="hour"),
        _budget("rolling", window=0.3, name="window18s"),
    ]
    cfg = parse(
        {
            "providers": {"a": {"base_url": "http://127.0.0.1:9"}},
            "deployments": {"d": {"provider": "a", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
            "budgets": {"limits": [b.model_dump() for b in budgets]},
        },
        "t.yaml",
    )
    crash = float(calendar.timegm((2027, 2, 28, 9, 50, 0)))  # ten minutes before day-west's day ends
    ledger = Ledger(SqliteBackend(tmp_path / "spend.db"), flush_interval=60)
    for i, age in enumerate([40 * 86400, 3 * 86400, 86400 + 5, 7200, 900, 60, 10, 1]):
        ledger.record(
            RequestRecord(f"r{i}", crash - age, "m", route="m", user="u", status=200, outcome="ok",
                          usage=Usage(1, 1), cost_usd=0.25)
        )  # fmt: skip
    in_flight = [B.charge(b, "u", B.period_of(b, crash - 2), B.to_nano(1), -1) for b in budgets]
    for c in in_flight:
        ledger.journal("crashed", crash - 2, c.store_key, c.amount)
    ledger.flush()
    found = restore.read(ledger.backend, cfg, now=crash)
    ledger.close()

    clock = Clock(crash)
    store = B.LocalBudgetStore(clock)
    for (key, slot), amount in found.budgets.items():
        store.add_read_back(key, amount, slot)

    def spent(b: Budget) -> float:
        return store.used(B.charge(b, "u", B.period_of(b, clock.now), 0, -1)) / B.NANO

    in_period = {b.name: [age for age in [40 * 86400, 3 * 86400, 86400 + 5, 7200, 900, 60, 10, 1]
                          if crash - age >= B.period_of(b, crash).starts_at] for b in budgets}  # fmt: skip
    for b in budgets:
        assert spent(b) == 0.25 * len(in_period[b.name]) + 1, b.name
    ends = {b.name: B.period_of(b, crash).resets_at for b in budgets}
    for b in budgets:  # each period to its last second, with a charge of another user each minute
        t = crash
        while t < ends[b.name] - 1:
            t = min(t + 60, ends[b.name] - 1)
            clock.now = t
            store.reserve_now([B.charge(budgets[0], "other", B.period_of(budgets[0], t), 1, -1)])
            if not b.period == "rolling":
                assert spent(b) == 0.25 * len(in_period[b.name]) + 1, (b.name, t)
        if b.period == "rolling":  # its oldest read-back slot leaves first: what is left counts
            clock.now = crash
            assert spent(b) == 0.25 * len(in_period[b.name]) + 1, b.name
    clock.now = max(ends.values()) + 29 * 3600
    for _ in range(3):
        clock.now += 1
        store.reserve_now([B.charge(budgets[0], "other", B.period_of(budgets[0], clock.now), 1, -1)])
    assert list(store.counters()) == [f"day-west:other:{B.period_of(budgets[0], clock.now).id}"]


async def test_through_the_proxy_a_request_across_a_day_end_and_a_suspend_counts_once_in_its_day(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Admitted seconds before a UTC day ends, the machine suspended 26 hours while it runs:
    # another user's request after the resume sweeps the ended day; the first settles into
    # its own day. The new day has its whole limit ($3.5 a request's worth: three fit), and
    # the ledger has the request once, in the day it started.
    up = await start_upstream(reply_words=40, latency_ms=1500)
    db = tmp_path / "spend.db"
    cost = 5 * 2.0 / 1e6  # max_tokens 5 at $2 per million output tokens, input free
    keys = {"alice": {"token": "sk-alice", "user": "alice"}, "bob": {"token": "sk-bob", "user": "bob"}}
    cfg = one_deployment(
        up.base_url,
        keys=keys,
        ledger={"path": str(db), "flush_interval": 0.2},
        budgets={"limits": [{"name": "user-day", "scope": "user", "limit_usd": cost * 3.5, "period": "day"}]},
    )
    real = time.time
    day_end = (real() // 86400 + 1) * 86400
    skew = day_end - 5.0 - real()
    monkeypatch.setattr(time, "time", lambda: real() + skew)
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def admitted(token: str, n: int) -> int:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
        ok = 0
        try:
            for _ in range(n):
                try:
                    await client.chat.completions.create(**body)
                    ok += 1
                except openai.RateLimitError as e:
                    assert e.code == "budget_exceeded"
        finally:
            await client.close()
        return ok

    async with cost_proxy(cfg) as proxy:
        control: Any = proxy.app[ADMISSION]
        across = asyncio.create_task(admitted("sk-alice", 1))

        async def held() -> bool:
            return bool(control.reserved)

        await eventually(held, "the request admitted")
        assert time.time() < day_end
        skew += 26 * 3600
        assert await admitted("sk-bob", 1) == 1  # the first charge after the resume: it sweeps
        assert await across == 1
        store = control.local_budgets
        ended = time.strftime("%Y-%m-%d", time.gmtime(day_end - 1))
        assert not any(k.endswith(ended) for k in store.counters())
        assert await admitted("sk-alice", 4) == 3
    rows = _rows(db)
    first = [r for r in rows if r["key_id"] == "alice" and r["ts"] < day_end]
    assert len(first) == 1 and first[0]["cost_usd"] == pytest.approx(cost)
    assert len([r for r in rows if r["key_id"] == "alice" and r["outcome"] == "ok"]) == 4


def test_a_follow_pass_costs_its_batch_and_each_counter_has_its_turn() -> None:
    # Each pass built a list of every counter to take 5,000 of them: 20 ms of event loop a
    # second at 250,000 (as many as users a per-user monthly budget charged).
    def store_of(n: int) -> B.LocalBudgetStore:
        store = B.LocalBudgetStore(Clock())
        month, hour = _budget("month", name="m"), _budget("rolling", window=1, name="r")
        for i in range(n):
            store.reserve_now([_charge(month if i % 5 else hour, f"u{i}", START)])
        return store

    def pass_s(store: B.LocalBudgetStore) -> float:
        best = math.inf
        for _ in range(5):
            t = time.perf_counter()
            store.to_follow(0, 5000)
            best = min(best, time.perf_counter() - t)
        return best

    small, large = store_of(10_000), store_of(250_000)
    assert pass_s(large) < 4 * pass_s(small), (pass_s(large), pass_s(small))

    # Every counter has its turn once in a round, counters made and dropped meanwhile included.
    clock = Clock()
    store = B.LocalBudgetStore(clock)
    day, hour = _budget("day", name="d"), _budget("rolling", window=1, name="r")
    for i in range(12_000):
        store.reserve_now([_charge(day if i % 3 else hour, f"u{i}", clock.now)])
    clock.now = B.period_of(day, clock.now).resets_at + 3 * 3600  # the day's counters end
    while store.sweep(clock.now):
        pass
    for i in range(3_000):
        store.reserve_now([_charge(day, f"new{i}", clock.now)])
    seen: list[str] = []
    start = 0
    while True:
        cal, rolling, start = store.to_follow(start, 5000)
        seen += cal + rolling
        if start == 0:
            break
    assert sorted(seen) == sorted(store.counters())
