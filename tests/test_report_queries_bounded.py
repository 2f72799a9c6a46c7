"""The operator's queries (request log, spend) cannot starve the gateway (redO H1, M1).

A team's viewer floods `/admin/requests` with queries that cannot finish (the table is locked
by another session, as a long scan would hold them): root's revocation of another team's key
still answers at once and the key is refused at once; a key past its limit of queries in
flight gets 429 `too_many_queries`; a query past `request_log.query_timeout_s` gets 503
`query_timeout`. Spend by model stays bounded whatever model names clients send.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from edgeroute.cost import reports
from edgeroute.cost.ledger_store import SqliteBackend
from edgeroute.requestlog import gate
from tests.conftest import simple_config
from tests.governance_support import call
from tests.test_governance_keys import _proxy

ROOT = "tok-root-0123456789"
FLOOD = "/admin/requests?since=30d&min_latency_ms=100000000&limit=500"
# More queries than the default executor has threads, wherever the test runs.
DEFAULT_THREADS = min(32, (os.cpu_count() or 1) + 4)


def _cfg(up: Any, ledger: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    cfg["ledger"] = ledger
    cfg["request_log"] = {"query_timeout_s": timeout_s, "max_queries_per_key": 2}
    return cfg


async def _key(url: str, team: str, role: str) -> dict[str, Any]:
    status, made = await call("POST", url + "/admin/keys", ROOT, json={"team": team, "role": role})
    assert status == 201, made
    return made


async def _get(url: str, token: str) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    hdrs = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.get(url, headers=hdrs) as r,
    ):
        return r.status, {**await r.json(), "_retry_after": r.headers.get("Retry-After")}, time.monotonic() - t0


@contextlib.contextmanager
def _pg_locked(dsn: str) -> Iterator[None]:
    """The request log's table locked by another session: every query of it waits."""
    with psycopg.connect(dsn) as conn:
        conn.execute("LOCK TABLE requests IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


async def test_a_viewers_flood_cannot_hold_back_a_revocation_on_postgres(start_upstream, pg_schema_dsn: str) -> None:
    up = await start_upstream()
    # A deadline of 4 s: the team's slots stay held well past the refused query's wait (half of it).
    async with _proxy(_cfg(up, {"backend": "postgres", "dsn": pg_schema_dsn}, timeout_s=4)) as url:
        victim = await _key(url, "alpha", "service")
        assert (await call("GET", url + "/v1/models", victim["secret"]))[0] == 200
        viewers = [await _key(url, "beta", "viewer") for _ in range(DEFAULT_THREADS // 2 + 2)]
        with _pg_locked(pg_schema_dsn):
            flood = [asyncio.create_task(_get(url + FLOOD, v["secret"])) for v in viewers for _ in range(2)]
            await asyncio.sleep(0.5)  # every query sent, and waiting
            # A query of a viewer (of a team) with queries in flight waits briefly, then is refused.
            status, body, _ = await _get(url + FLOOD, viewers[0]["secret"])
            assert status == 429 and body["error"]["code"] == "too_many_queries", body
            assert body["_retry_after"] == "1"
            t0 = time.monotonic()
            status, revoked = await call("DELETE", url + f"/admin/keys/{victim['id']}", ROOT)
            took = time.monotonic() - t0
            assert status == 200 and revoked["status"] == "revoked", revoked
            assert took < 2.0, f"the revocation took {took:.1f} s"
            status, err = await call("GET", url + "/v1/models", victim["secret"])
            assert status == 401 and err["error"]["code"] == "key_revoked", err
            # The operator's own report still gets its turn: one team cannot fill the pool.
            status, body, took = await _get(url + "/admin/spend?by=model", ROOT)
            assert status == 200 and took < 8, (status, body, took)
            answers = await asyncio.gather(*flood)
        codes = sorted((s, b["error"]["code"]) for s, b, _ in answers)
        # The team's four (twice a key's) ran to their deadline; the rest were refused at once.
        assert codes == [(429, "too_many_queries")] * (len(answers) - 4) + [(503, "query_timeout")] * 4, codes
        timed_out = [b for s, b, _ in answers if b["error"]["code"] == "query_timeout"]
        assert "longer than 4 s" in timed_out[0]["error"]["message"], timed_out[0]
        assert max(t for *_, t in answers) < 20


def _fill(path: Path, rows: int) -> None:
    """`rows` requests of team beta over the last days, straight into the log: a scan of them
    takes some 100 ms, far past the test's deadline (a year's log would take minutes)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.execute(
            """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO requests (id, ts, team, model, route, stream, status, outcome, latency_ms, queue_ms,
                prompt_tokens, completion_tokens, tokens_estimated, cost_usd, baseline_cost_usd, attempts, detail)
            SELECT printf('fill-%07d', i), ? - i * 0.5, 'beta', 'm', 'm', 0, 200, 'ok', 10, 0, 1, 1, 0, 0, 0, 1, '{}'
            FROM n""",
            (rows - 1, time.time()),
        )
        conn.commit()
    finally:
        conn.close()


async def test_a_query_past_its_deadline_gets_503_on_sqlite(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    async with _proxy(_cfg(up, {"backend": "sqlite", "path": str(db)}, timeout_s=0.02)) as url:
        viewer = await _key(url, "beta", "viewer")
        await asyncio.to_thread(_fill, db, 300_000)
        status, body, _ = await _get(url + FLOOD, viewer["secret"])
        assert status == 503 and body["error"]["code"] == "query_timeout", body
        assert "longer than 0.02 s" in body["error"]["message"] and "Narrow it" in body["error"]["message"]
        status, body, _ = await _get(url + "/admin/requests?limit=5", viewer["secret"])
        assert status == 200 and len(body["data"]) == 5, body  # the newest page is quick


def test_a_sqlite_scan_that_would_not_end_is_stopped_at_its_deadline(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "ledger.db")
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    t0 = time.monotonic()
    try:
        gate.Bounded(backend, 0.3).query(endless, [])
    except gate.QueryTimeout:
        pass
    else:
        raise AssertionError("the endless query ended")
    finally:
        backend.close()
    assert time.monotonic() - t0 < 2


async def test_spend_by_model_stays_bounded_with_a_thousand_unknown_models(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    async with _proxy(_cfg(up, {"backend": "sqlite", "path": str(db)}, timeout_s=10)) as url:
        svc = await _key(url, "beta", "service")
        viewer = await _key(url, "beta", "viewer")
        async with aiohttp.ClientSession() as s:

            async def ask(model: str) -> int:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                hdrs = {"Authorization": f"Bearer {svc['secret']}"}
                async with s.post(url + "/v1/chat/completions", json=body, headers=hdrs) as r:
                    await r.read()
                    return r.status

            for i in range(0, 1000, 100):
                got = await asyncio.gather(*(ask(f"made-up-{j:04d}") for j in range(i, i + 100)))
                assert set(got) == {404}, got
            assert await ask("m") == 200

        async def counted() -> dict[str, Any]:
            status, body, _ = await _get(url + "/admin/spend?by=model", viewer["secret"])
            assert status == 200, body
            return body

        deadline = time.monotonic() + 15
        while (report := await counted())["total"]["requests"] < 1001:
            assert time.monotonic() < deadline, report["total"]
            await asyncio.sleep(0.2)
        rows = {r["model"]: r["requests"] for r in report["rows"]}
        assert rows == {"(unrouted)": 1000, "m": 1}, rows


async def test_a_refused_request_keeps_little_of_its_prompt(start_upstream, tmp_path: Path) -> None:
    """redO M3: a request the upstream refuses ($0) kept up to 64 KB of prompt, so a key's
    refused requests filled `max_db_mb`, whose oldest-first eviction then took every team's rows."""
    ok, refusing = await start_upstream(), await start_upstream(fail_status=400, fail_message="no")
    cfg = _cfg(ok, {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}, timeout_s=10)
    cfg["providers"]["b"] = {"base_url": refusing.base_url, "api_key": "key-b"}
    cfg["deployments"]["d-b"] = {**cfg["deployments"]["d-a"], "provider": "b"}
    cfg["models"]["refused"] = {"deployments": ["d-b"]}
    cfg["request_log"]["log_content"] = "full"
    prompt = "word " * 15_000  # 75 KB
    async with _proxy(cfg) as url, aiohttp.ClientSession(headers={"Authorization": f"Bearer {ROOT}"}) as s:
        for model, status in (("refused", 400), ("m", 200)):
            body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == status, await r.text()
        deadline = time.monotonic() + 15
        while len(rows := (await _get(url + "/admin/requests", ROOT))[1]["data"]) < 2:
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.1)
        kept = {}
        for row in rows:
            status, full, _ = await _get(url + f"/admin/requests/{row['id']}", ROOT)
            assert status == 200, full
            kept[full["model"]] = (len(full["content"]["request"]), full["content"]["truncated"])
    assert kept["refused"][0] <= 2048 and kept["refused"][1], kept
    assert kept["m"][0] == 64 * 1024, kept  # a paid request keeps up to max_content_bytes, as before


class _Grouped:
    """A ledger answering spend's grouped query with `n` groups, biggest spender first."""

    dialect = "sqlite"

    def __init__(self, n: int) -> None:
        self.rows = [(f"user-{i:05d}", 1, 1, 10, 5, (n - i) / 1000, (n - i) / 500) for i in range(n)]

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        return self.rows


def test_a_report_past_the_row_cap_folds_the_smallest_into_other() -> None:
    report = reports.spend(_Grouped(1205), by="user")
    rows = report["rows"]
    assert len(rows) == reports.MAX_ROWS and report["folded_groups"] == 206
    assert rows[-1]["user"] == "(other)" and rows[-1]["requests"] == 206 and rows[-2]["user"] == "user-00998"
    assert report["total"]["requests"] == 1205 and report["total"]["prompt_tokens"] == 12050
    csv_rows = reports.render(report, "csv").splitlines()
    assert len(csv_rows) == 1 + reports.MAX_ROWS and csv_rows[-1].startswith('"(other)",206,')


async def test_a_console_pages_panels_sent_at_once_are_all_answered(start_upstream, tmp_path: Path) -> None:
    """The routing page loads seven panels at once with one key: past the key's two, they wait
    for a slot (briefly) rather than getting the 429."""
    up = await start_upstream()
    async with _proxy(_cfg(up, {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}, timeout_s=10)) as url:
        viewer = await _key(url, "beta", "viewer")
        panels = [f"/admin/stats?since=24h&group_by={g}" for g in ("deployment", "rule", "policy", "task", "variant")]
        panels += ["/admin/spend?by=route&since=24h", "/admin/spend?by=outcome&since=24h"]
        answers = await asyncio.gather(*(_get(url + p, viewer["secret"]) for p in panels))
        assert [s for s, _, _ in answers] == [200] * 7, answers
