"""One tenant's slow report queries cannot hold the query threads of the others (red3M F2, F3;
red4 F2, F3: a viewer key of no team is a tenant too, and a few teams' floods leave the others a place).

Team viewers keep their queries in flight, each running to its deadline (on PostgreSQL the
request log's table is locked by another session; on SQLite the page's scan does not end,
as a scan of millions of unindexed rows would not). Meanwhile root's `/admin/stats` and
another team's pages answer at once, never a 503 `queries_busy`, and each flooding query is
answered within its deadline, its wait for a thread included.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from edgeroute.errors import ProxyError
from edgeroute.requestlog import gate, query
from tests.governance_support import call
from tests.test_governance_keys import _proxy
from tests.test_report_queries_bounded import FLOOD, ROOT, _cfg, _get, _key, _pg_locked

TIMEOUT_S = 4.0
QUICK_S = 1.5  # what a trivial query may take on a busy test machine (it takes some 20 ms)


@contextlib.contextmanager
def _slow_pages(backend: str, dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The flood's page (`min_latency_ms`, which no index serves) runs to its deadline."""
    if backend == "postgres":  # the page waits for the table: every page does (stats and spend do not)
        with _pg_locked(dsn):
            yield
        return
    real = query.list_requests

    def scan(db: query.Readable, q: Mapping[str, str], now: float | None, tenant: str | None) -> dict[str, Any]:
        while "min_latency_ms" in q:  # a step of the scan at a time, each stopped past the deadline
            db.query("SELECT 1", [])
            time.sleep(0.02)
        return real(db, q, now, tenant)

    monkeypatch.setattr(query, "list_requests", scan)
    yield


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(backend, PostgreSQL's DSN, the config's `ledger`)."""
    if request.param == "sqlite":
        yield "sqlite", "", {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    else:
        dsn = request.getfixturevalue("pg_schema_dsn")
        yield "postgres", dsn, {"backend": "postgres", "dsn": dsn}


def _timed_out(answers: list[tuple[int, dict[str, Any], float]]) -> None:
    """Every flooding query ran to its deadline, counted from its arrival (a query that waited
    for a thread did not then run a deadline more)."""
    assert {(s, b["error"]["code"]) for s, b, _ in answers} == {(503, "query_timeout")}, answers
    assert max(t for *_, t in answers) < TIMEOUT_S + QUICK_S, [t for *_, t in answers]


@pytest.mark.parametrize("viewers", [1, 2], ids=["one-key", "the-teams-four"])
async def test_a_viewers_slow_queries_leave_root_and_other_teams_their_thread(
    start_upstream: Any, ledger: tuple[str, str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, viewers: int
) -> None:
    backend, dsn, cfg_ledger = ledger
    up = await start_upstream()
    async with _proxy(_cfg(up, cfg_ledger, timeout_s=TIMEOUT_S)) as url:
        beta = [await _key(url, "beta", "viewer") for _ in range(viewers)]
        gamma = await _key(url, "gamma", "viewer")
        # Gamma's console: a page of its requests (on PostgreSQL the table is locked: its stats).
        gamma_page = "/admin/requests?limit=1" if backend == "sqlite" else "/admin/stats?since=1h"
        for path, token in (("/admin/stats?since=1h", ROOT), (gamma_page, gamma["secret"])):
            assert (await _get(url + path, token))[0] == 200
        with _slow_pages(backend, dsn, monkeypatch):
            flood = [asyncio.create_task(_get(url + FLOOD, v["secret"])) for v in beta for _ in range(2)]
            await asyncio.sleep(0.3)  # every flooding query in flight
            status, body, took = await _get(url + "/admin/stats?since=1h", ROOT)
            assert status == 200 and took < QUICK_S, (status, body, took)
            status, body, took = await _get(url + gamma_page, gamma["secret"])
            assert status == 200 and took < QUICK_S, (status, body, took)
            _timed_out(await asyncio.gather(*flood))


async def test_two_teams_floods_do_not_lock_the_operator_out(
    start_upstream: Any, ledger: tuple[str, str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, dsn, cfg_ledger = ledger
    up = await start_upstream()
    async with _proxy(_cfg(up, cfg_ledger, timeout_s=TIMEOUT_S)) as url:
        viewers = [await _key(url, team, "viewer") for team in ("beta", "gamma") for _ in range(2)]
        with _slow_pages(backend, dsn, monkeypatch):
            flood = [asyncio.create_task(_get(url + FLOOD, v["secret"])) for v in viewers for _ in range(2)]
            await asyncio.sleep(0.3)  # each key's two in flight: the teams' eight
            for path in ("/admin/stats?since=1h", "/admin/spend?by=team"):
                status, body, took = await _get(url + path, ROOT)
                assert status == 200 and took < QUICK_S, (path, status, body, took)
            _timed_out(await asyncio.gather(*flood))


async def _team_less(url: str, role: str) -> dict[str, Any]:
    status, made = await call("POST", url + "/admin/keys", ROOT, json={"role": role})
    assert status == 201, made
    return dict(made)


@pytest.mark.parametrize("other", ["a-team", "a-second-team-less-viewer"])
async def test_team_less_viewers_slow_queries_leave_root_its_thread(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other: str
) -> None:
    """A viewer key of no team (a dashboard's) is a tenant of its own: it no longer shares the
    thread kept for root and the team-less operator keys."""
    up = await start_upstream()
    cfg = _cfg(up, {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}, timeout_s=TIMEOUT_S)
    async with _proxy(cfg) as url:
        viewers = [await _team_less(url, "viewer")]
        viewers.append(await _key(url, "beta", "viewer") if other == "a-team" else await _team_less(url, "viewer"))
        operator = await _team_less(url, "operator")
        with _slow_pages("sqlite", "", monkeypatch):
            flood = [asyncio.create_task(_get(url + FLOOD, v["secret"])) for v in viewers for _ in range(2)]
            await asyncio.sleep(0.3)  # every flooding query in flight
            for token in (ROOT, operator["secret"]):
                status, body, took = await _get(url + "/admin/stats?since=1h", token)
                assert status == 200 and took < QUICK_S, (status, body, took)
            _timed_out(await asyncio.gather(*flood))


async def test_four_teams_floods_leave_a_fifth_team_its_place(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four teams' viewers with all of their teams' queries in flight (16) no longer refuse a
    fifth team 503 `queries_busy`: it has its share of the places, and the next free thread."""
    up = await start_upstream()
    cfg = _cfg(up, {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}, timeout_s=TIMEOUT_S)
    async with _proxy(cfg) as url:
        viewers = [await _key(url, team, "viewer") for team in ("b", "c", "d", "e") for _ in range(2)]
        fifth = await _key(url, "f", "viewer")
        with _slow_pages("sqlite", "", monkeypatch):
            flood = [asyncio.create_task(_get(url + FLOOD, v["secret"])) for v in viewers for _ in range(2)]
            await asyncio.sleep(1.0)  # all 16 in flight (and room before the first two's deadline)
            status, body, took = await _get(url + "/admin/stats?since=1h", ROOT)
            assert status == 200 and took < QUICK_S, (status, body, took)
            status, body, took = await _get(url + "/admin/stats?since=1h", fifth["secret"])
            assert status == 200 and took < TIMEOUT_S, (status, body, took)
            _timed_out(await asyncio.gather(*flood))


async def test_a_free_thread_goes_to_the_team_served_least_recently_and_a_gone_client_leaves_the_line() -> None:
    g = gate.Gate()
    started: list[str] = []
    hold = {name: threading.Event() for name in ("b1", "b2", "g1", "d1")}

    def job(name: str) -> Any:
        def call() -> str:
            started.append(name)
            if name in hold:
                hold[name].wait(10)
            return name

        return call

    def who(team: str) -> list[tuple[str, int, str]]:
        return [(f"key:{team}", 4, "This key"), (f"team:{team}", 8, "Team")]

    async def ask(name: str, team: str | None) -> Any:
        caller = who(team) if team else [("key:root", 4, "This key")]
        g.admit(caller)
        queued = g.submit(caller, job(name), time.monotonic() + 10)
        try:
            return await queued.done
        except asyncio.CancelledError:
            g.withdraw(queued)  # as `gate.run` does when its handler is cancelled
            raise

    try:
        asked = {n: asyncio.create_task(ask(n, t)) for n, t in [("b1", "beta"), ("b2", "beta"), ("b3", "beta")]}
        asked |= {n: asyncio.create_task(ask(n, t)) for n, t in [("g1", "gamma"), ("d1", "delta"), ("r1", None)]}
        await asyncio.sleep(0.2)
        # A team one at a time, the teams two at most, and the operator's thread.
        assert sorted(started) == ["b1", "g1", "r1"] and await asked["r1"] == "r1", started
        asked["b3"].cancel()  # its client hung up while it waited: its slots are free again
        await asyncio.sleep(0.05)
        assert g.held["key:beta"] == 2 and g.in_flight["tenants"] == 4, (g.held, g.in_flight)
        hold["b1"].set()  # beta's thread is free: delta, never served, goes before beta's second
        await asyncio.sleep(0.2)
        assert started[3:] == ["d1"], started
        for e in hold.values():
            e.set()
        assert [await asked[n] for n in ("b1", "b2", "g1", "d1")] == ["b1", "b2", "g1", "d1"]
        assert started[3:] == ["d1", "b2"], started
        assert g.held == {} and g.in_flight == {}, (g.held, g.in_flight)
    finally:
        for e in hold.values():
            e.set()
        g.close()


def test_past_the_places_a_tenant_gets_its_fair_share_and_no_more() -> None:
    """The places stay bounded: past 16 in flight, a tenant is admitted up to 16 over the
    tenants in flight (at least one each), then refused 503 `queries_busy`."""
    g = gate.Gate()
    try:
        for team in "bcde":
            for k in range(2):
                for _ in range(2):
                    g.admit([(f"key:{team}{k}", 2, "This key"), (f"team:{team}", 4, "Team")])
        answers = []
        for k in range(4):
            try:
                g.admit([(f"key:f{k}", 2, "This key"), ("team:f", 4, "Team")])
                answers.append(200)
            except ProxyError as e:
                answers.append(e.status)
        assert answers == [200, 200, 200, 503], answers  # 16 // 5 tenants in flight: 3
        g.admit([("solo:v", 2, "This key")])  # a sixth tenant still gets one
        g.admit([("key:root", 2, "This key")])  # and the operator's places are apart
    finally:
        g.close()
