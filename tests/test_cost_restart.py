"""Spend survives restarts: budgets and rate-limit windows rebuilt from the ledger (with the
reservations of requests in flight at a crash), and budgets and limits that reload."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import yaml
from aiohttp.test_utils import TestServer

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.config import Budget, parse
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import PostgresBackend
from edgeroute.server import create_app
from edgeroute.state import RECORDER
from tests.conftest import eventually
from tests.scale.support import wait_ready
from tests.serve_support import free_port

CENT = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.01}  # every request costs exactly $0.01


def _config(upstream: str, db: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]},
    }
    cfg.update(extra)
    return cfg


class Served:
    """A real `edgeroute serve` process (started and killed by this test only). Ready when its
    /readyz says so: its output goes to a file (a log line may come before "listening", and
    nobody must block the event loop reading a pipe), shown when it does not start."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    def spawn(cls, cfg_path: Path, port: int) -> Served:
        log = cfg_path.with_name(f"serve-{port}.log")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeroute", "serve", "--config", str(cfg_path), "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        return cls(proc, port, log)

    @classmethod
    async def start(cls, cfg_path: Path) -> Served:
        served = cls.spawn(cfg_path, free_port())
        try:
            await wait_ready(served.url, within=60)
        except AssertionError:
            served.kill()
            raise AssertionError(served.log.read_text(errors="replace")[-3000:]) from None
        return served

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


async def _admitted(url: str, n: int, concurrent: bool = False) -> int:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        return await _send(client, n, concurrent)


async def _send(client: openai.AsyncOpenAI, n: int, concurrent: bool) -> int:
    async def one() -> int:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.RateLimitError:
            return 0
        return 1

    if concurrent:
        return sum(await asyncio.gather(*(one() for _ in range(n))))
    return sum([await one() for _ in range(n)])


async def _budgets(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/budgets") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def test_a_budget_is_not_forgotten_across_a_hard_kill(start_upstream: Any, tmp_path: Path) -> None:
    """The reported case: room for 10, 15 sent, killed, restarted: no more admitted today."""
    up = await start_upstream()
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(_config(up.base_url, tmp_path / "l.db")))
    first = await Served.start(path)
    try:
        assert await _admitted(first.url, 15) == 10
        await asyncio.sleep(0.4)  # past one flush interval
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        view = await _budgets(second.url)
        assert view["budgets"][0]["spent_usd"] == 0.10 and view["budgets"][0]["percent"] == 100
        assert await _admitted(second.url, 10) == 0
    finally:
        second.kill()


async def crash_with_four_in_flight(path: Path) -> None:
    """Serves `path` (whose upstream answers after 5 s), sends it 4 requests at once, and kills
    it with SIGKILL once their reservations ($0.01 each) are journaled."""
    first = await Served.start(path)
    try:
        flight = asyncio.ensure_future(_admitted(first.url, 4, concurrent=True))
        for _ in range(100):
            if (await _budgets(first.url))["budgets"][0]["reserved_usd"] >= 0.04:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)  # the reservations are journaled with the next flush
    finally:
        first.kill()
    await asyncio.gather(flight, return_exceptions=True)


async def test_requests_in_flight_at_a_crash_count_as_spent(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(latency_ms=5000)  # answers after the crash
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(_config(up.base_url, tmp_path / "l.db")))
    await crash_with_four_in_flight(path)
    fast = await start_upstream()
    path.write_text(yaml.safe_dump(_config(fast.base_url, tmp_path / "l.db")))
    second = await Served.start(path)
    try:
        assert (await _budgets(second.url))["budgets"][0]["spent_usd"] == 0.04
        assert await _admitted(second.url, 10) == 6
    finally:
        second.kill()


async def test_rate_limit_window_survives_a_restart(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    path = tmp_path / "edge.yaml"
    cfg = _config(up.base_url, tmp_path / "l.db", rate_limits={"models": {"m": {"rpm": 5}}})
    del cfg["budgets"]
    path.write_text(yaml.safe_dump(cfg))
    first = await Served.start(path)
    try:
        assert await _admitted(first.url, 6) == 5
        await asyncio.sleep(0.4)
    finally:
        first.kill()
    second = await Served.start(path)
    try:
        view = await _budgets(second.url)
        (m,) = [r for r in view["rate_limits"] if r["scope"] == "model"]
        assert m["rpm_limit"] == 5 and m["rpm_used"] > 4
        assert await _admitted(second.url, 3) == 0
    finally:
        second.kill()


async def test_requests_in_flight_at_a_crash_count_against_rate_limits(start_upstream: Any, tmp_path: Path) -> None:
    """Four requests of a model held to 4 a minute reach the provider; the server is killed
    before they are answered. Restarted, it admitted 4 more at once (the provider saw 8 in the
    minute): the limits were read back from spend rows only, which in-flight requests have not."""
    slow = await start_upstream(latency_ms=30_000, record=True)
    db = tmp_path / "l.db"
    path = tmp_path / "edge.yaml"
    # Nothing of a budget: the takes are journaled for the limits alone. A bucket refills its
    # limit a minute: at 10,000 tokens the four requests' 56 (9 + 5 each) refilled within a
    # third of a second of the restart, before a loaded machine read them. At 120 (2 a second)
    # they last tens of seconds, and leave room for the four sent after the restart (the
    # requests per minute alone refuse those).
    cfg = _config(slow.base_url, db, rate_limits={"models": {"m": {"rpm": 4, "tpm": 120}}})
    del cfg["budgets"]
    path.write_text(yaml.safe_dump(cfg))
    first = await Served.start(path)
    try:
        flight = asyncio.ensure_future(_admitted(first.url, 4, concurrent=True))

        async def sent() -> bool:
            return len(slow.options.requests) == 4

        async def journaled() -> bool:
            with sqlite3.connect(db) as c:
                return bool(c.execute("SELECT COUNT(DISTINCT request_id) FROM reservations").fetchone()[0] == 4)

        await eventually(sent, "4 requests at the provider")
        with contextlib.suppress(AssertionError):  # a server that journals nothing: what follows fails
            await eventually(journaled, "their takes journaled", within=10)
    finally:
        first.kill()
    await asyncio.gather(flight, return_exceptions=True)
    fast = await start_upstream(record=True)
    path.write_text(yaml.safe_dump({**cfg, "providers": {"a": {"base_url": fast.base_url}}}))
    second = await Served.start(path)
    try:
        view = await _budgets(second.url)
        (m,) = [r for r in view["rate_limits"] if r["scope"] == "model"]
        assert m["rpm_limit"] == 4 and m["rpm_used"] > 3, m
        assert m["tpm_used"] > 3 * 5, m  # each reserved its prompt and max_tokens
        assert await _admitted(second.url, 4) == 0
        assert fast.options.requests == []
    finally:
        second.kill()


async def test_a_requests_takes_reach_the_ledger_in_one_batch(start_upstream: Any, tmp_path: Path) -> None:
    """The ledger's writer thread takes the journal at any moment, also between two rows of one
    request's takes: its requests row could be written in one batch and its tokens row in the
    next, and a crash between the two counted the request against RPM but not TPM after the
    restart. Here the writer takes its batch right after the first row the proxy journals."""
    up = await start_upstream()
    db = tmp_path / "l.db"
    cfg = _config(up.base_url, db, rate_limits={"models": {"m": {"rpm": 4, "tpm": 10_000}}})
    cfg["ledger"]["flush_interval"] = 1  # the longest: the writer waits, this test flushes
    del cfg["budgets"]
    app = create_app(parse(cfg, str(tmp_path / "edge.yaml")))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    ledger = app[RECORDER]
    assert isinstance(ledger, Ledger)
    seen: list[list[str]] = []

    class Drained(collections.deque):  # type: ignore[type-arg]
        """The journal; the writer drains it after the first row added to it."""

        def append(self, row: Any) -> None:
            super().append(row)
            self._drained()

        def extend(self, rows: Any) -> None:
            super().extend(rows)
            self._drained()

        def _drained(self) -> None:
            if self and not seen:
                ledger._flush()
                with sqlite3.connect(db) as c:
                    seen.append(sorted(k.split("|")[2] for (k,) in c.execute("SELECT store_key FROM reservations")))

    ledger._journal = Drained()
    try:
        assert await _admitted(f"http://127.0.0.1:{server.port}", 1) == 1
    finally:
        await server.close()
    assert seen == [["requests", "tokens"]]


async def test_budgets_and_limits_reload_keeping_their_spend(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    path = tmp_path / "edge.yaml"
    cfg = _config(up.base_url, tmp_path / "l.db", rate_limits={"models": {"m": {"rpm": 100}}})
    cfg["budgets"]["limits"][0]["limit_usd"] = 1.0
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)

    async def reload() -> None:
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()

    try:
        assert await _admitted(served.url, 5) == 5
        # Lowered to room for 7: the 5 already spent carry over, so 2 more get in.
        cfg["budgets"]["limits"][0]["limit_usd"] = 0.07
        # A new budget counts what the ledger already holds for its period.
        cfg["budgets"]["limits"].append({"name": "team-less", "scope": "global", "limit_usd": 5, "period": "month"})
        path.write_text(yaml.safe_dump(cfg))
        await asyncio.sleep(0.3)  # flushed
        await reload()
        assert await _admitted(served.url, 4) == 2
        await asyncio.sleep(0.2)
        view = {b["name"]: b for b in (await _budgets(served.url))["budgets"]}
        assert view["ten"]["spent_usd"] == 0.07 and view["ten"]["limit_usd"] == 0.07
        assert view["team-less"]["spent_usd"] == 0.07  # 5 from the ledger, 2 since
        # A lowered rate limit takes effect at once: 7 requests this minute, the limit now 6.
        cfg["budgets"]["limits"] = []
        cfg["rate_limits"]["models"]["m"]["rpm"] = 6
        path.write_text(yaml.safe_dump(cfg))
        await reload()
        assert await _admitted(served.url, 2) == 0
    finally:
        served.kill()


async def test_a_budget_added_by_reload_counts_each_request_once(start_upstream: Any, tmp_path: Path) -> None:
    """Requests that started before the reload count from the ledger, once written, even when
    still running at the reload; those after it in memory; none twice. (A request that began
    after the reload but before the next admission was counted both ways; one in flight
    across the reload was not counted at all.)"""
    up = await start_upstream(latency_ms=1500)
    path = tmp_path / "edge.yaml"
    cfg = _config(up.base_url, tmp_path / "l.db")
    cfg["budgets"]["limits"][0]["limit_usd"] = 1.0
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)
    try:
        assert await _admitted(served.url, 1) == 1  # written well before the reload
        across = asyncio.create_task(_admitted(served.url, 1))  # in flight across the reload
        await asyncio.sleep(0.5)
        cfg["budgets"]["limits"].append({"name": "added", "scope": "global", "limit_usd": 5, "period": "day"})
        path.write_text(yaml.safe_dump(cfg))
        async with aiohttp.ClientSession() as s, s.post(served.url + "/admin/reload") as r:
            assert r.status == 200, await r.text()
        assert await _admitted(served.url, 2, concurrent=True) == 2  # after it
        assert await across == 1

        async def added() -> float | None:
            view = {b["name"]: b for b in (await _budgets(served.url))["budgets"]}
            spent: float = view["added"]["spent_usd"]
            return spent if spent >= 0.04 else None

        # Four requests of $0.01: the first and the one across the reload from the ledger.
        assert await eventually(added, "the added budget's spend", within=20) == 0.04
        await asyncio.sleep(0.5)  # nothing more arrives later (a count twice would)
        assert await added() == 0.04
    finally:
        served.kill()


def test_budget_report_projection_and_postgres_restore(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn
    ledger = Ledger(PostgresBackend(dsn), flush_interval=60)
    now = time.time()
    for i in range(30):
        team = ("red", "blue", None)[i % 3]
        ledger.record(
            RequestRecord(f"pg-{i}", now - 10 - i, "m", route="m", team=team, status=200, outcome="ok",
                          usage=Usage(1, 1), cost_usd=0.5)
        )  # fmt: skip
    ledger.journal("in-flight-1", now - 5, "per-team:red:" + B.period_of(_team_budget(), now).id, B.to_nano(0.25))
    ledger.journal("pg-0", now - 5, "per-team:red:" + B.period_of(_team_budget(), now).id, B.to_nano(9))  # settled
    ledger.flush()
    cfg = parse(
        {
            "providers": {"a": {"base_url": "http://127.0.0.1:9"}},
            "deployments": {"d": {"provider": "a", "model": "x"}},
            "models": {"m": {"deployments": ["d"]}},
            "budgets": {"limits": [_team_budget().model_dump(), {"name": "all", "scope": "global", "limit_usd": 100,
                                   "period": "rolling", "window_hours": 1}]},
            "rate_limits": {"models": {"m": {"rpm": 100, "tpm": 1000}}},
        },
        "t.yaml",
    )  # fmt: skip
    found = restore.read(ledger.backend, cfg, now=now)
    team_period = B.period_of(_team_budget(), now).id
    assert found.budgets[(f"per-team:red:{team_period}", -1)] == B.to_nano(10 * 0.5 + 0.25)
    assert found.budgets[(f"per-team:blue:{team_period}", -1)] == B.to_nano(5.0)
    rolling = sum(v for (k, _), v in found.budgets.items() if k.startswith("all:*:"))
    assert rolling == B.to_nano(15.0)
    buckets = {(n, k): used for n, k, _, used in found.buckets}
    # 30 requests 10 to 39 s old: each still holds 1 - age/60 of a request (and of its 2 tokens).
    weights = sum(1 - (10 + i) / 60 for i in range(30))
    assert abs(buckets[("model:m", "requests")] - weights) < 0.01
    assert abs(buckets[("model:m", "tokens")] - 2 * weights) < 0.02
    ledger.close()


def _team_budget() -> Budget:
    return Budget(name="per-team", scope="team", limit_usd=20, period="month")


def test_restore_matches_the_periods_of_the_store() -> None:
    """The keys read back are the keys admission charges (same period ids)."""
    b = Budget(name="d", scope="global", limit_usd=1, period="day", utc_offset_minutes=-300)
    now = time.time()
    p = B.period_of(b, now)
    assert p.starts_at <= now < p.resets_at and p.resets_at - p.starts_at in (82800, 86400, 90000)
    assert orjson.loads(orjson.dumps(p.id))  # a plain string
