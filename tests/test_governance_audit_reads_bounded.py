"""Audit reads cannot hold back key writes (redU M2).

`GET /admin/audit?action=` / `actor=` had no index, no deadline and no per-key limit, and ran on
the governance store's two threads holding its one SQLite connection's lock: a viewer's flood of
filtered reads made the root admin's `POST /admin/keys` answer 503 and delayed the key poll. Now
the filters have indexes (made at start on an existing store), an audit read runs on the
operator's query pool under `request_log.query_timeout_s` and `max_queries_per_key` (503
`query_timeout`, 429 `too_many_queries`), on a read connection of its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute.governance import store as store_mod
from edgeroute.governance.store import GovStore
from tests.conftest import simple_config
from tests.governance_support import call
from tests.test_governance_keys import _proxy

ROOT = "tok-root-0123456789"
VIEWER = "tok-viewer-0123456789"
ROWS = 300_000
# A filter the indexes cannot narrow (every entry is a `key.*` one, none in the last minute):
# it walks the whole log, some 0.3 s here, 3 s at 3 M entries.
SLOW = "/admin/audit?action=key&since=1m"


def _fill(path: Path, rows: int) -> None:
    """`rows` key changes of a year ago, as a busy deployment's audit log keeps them."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.execute(
            """WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO gov_audit (ts, actor, action, target, before, after)
            SELECT ? + i, 'key:ka' || (i % 50), 'key.updated', 'k' || i, '{"rpm":1}', '{"rpm":2}' FROM n""",
            (rows, time.time() - 365 * 86400),
        )
        conn.commit()
    finally:
        conn.close()


async def test_a_viewers_flood_of_audit_reads_is_bounded_and_key_writes_go_on(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "dash": {"token": VIEWER, "role": "viewer"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    cfg["ledger"] = {"backend": "sqlite", "path": str(db)}
    cfg["request_log"] = {"query_timeout_s": 0.15, "max_queries_per_key": 1}
    async with _proxy(cfg) as url:
        await asyncio.to_thread(_fill, db, ROWS)
        hdrs = {"Authorization": f"Bearer {VIEWER}"}
        answers: list[tuple[int, dict[str, Any], str | None, float]] = []
        stop = time.monotonic() + 3.0

        async def flood(s: aiohttp.ClientSession) -> None:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                async with s.get(url + SLOW, headers=hdrs) as r:
                    answers.append((r.status, await r.json(), r.headers.get("Retry-After"), time.monotonic() - t0))

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            flooding = [asyncio.create_task(flood(s)) for _ in range(8)]
            await asyncio.sleep(0.3)
            writes = []
            for i in range(3):
                t0 = time.monotonic()
                status, made = await call("POST", url + "/admin/keys", ROOT, {"name": f"during-{i}"})
                writes.append((status, round(time.monotonic() - t0, 2)))
                assert status == 201, made
                assert (await call("GET", url + "/v1/models", made["secret"]))[0] == 200
            await asyncio.gather(*flooding)
        assert all(st == 201 and took < 1.0 for st, took in writes), writes
        codes = {(st, b["error"]["code"] if st != 200 else None) for st, b, _, _ in answers}
        # One read at a time for the key (the others wait briefly, then 429); one the planner
        # cannot narrow stops at its deadline (or, once SQLite has the table's statistics, the
        # `ts` index serves it: a 200).
        assert (429, "too_many_queries") in codes, codes
        assert codes <= {(200, None), (429, "too_many_queries"), (503, "query_timeout")}, codes
        assert all(ra == "1" for st, _, ra, _ in answers if st == 429)
        for timed_out in (b for st, b, _, _ in answers if st == 503):
            assert "longer than 0.15 s" in timed_out["error"]["message"], timed_out
            assert "exact `action`" in timed_out["error"]["message"], timed_out
        assert max(t for *_, t in answers) < 1.5, sorted(round(t, 2) for *_, t in answers)[-5:]
        # The filters the indexes serve answer at once, however large the log.
        for path in ("/admin/audit?action=nomatch", "/admin/audit?actor=key:ka3&limit=5", "/admin/audit?action=key"):
            status, body = await call("GET", url + path, VIEWER)
            assert status == 200, (path, body)
        assert [e["action"] for e in body["entries"][:4]] == ["key.created"] * 3 + ["key.updated"], body["entries"][:4]


ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"


def test_an_audit_read_stops_at_its_deadline_and_holds_no_lock_meanwhile(tmp_path: Path) -> None:
    """A read that would not end, on the store's file and on an in-memory store: stopped at its
    deadline (TimeoutError: the API's 503 `query_timeout`); on the file, key writes and the key
    poll's reads go on meanwhile (it reads on a connection of its own)."""
    for target in (str(tmp_path / "gov.db"), ":memory:"):
        store = GovStore("sqlite", target)
        try:
            with ThreadPoolExecutor(1) as pool:
                t0 = time.monotonic()
                reading = pool.submit(store._read_until, ENDLESS, [], t0 + 1.0)
                if target != ":memory:":
                    time.sleep(0.1)  # the read is under way
                    store.audit("root", "key.created", "k1")
                    assert store.keys_seq() == 0 and time.monotonic() - t0 < 0.9
                with pytest.raises(TimeoutError):
                    reading.result(timeout=5)
                assert time.monotonic() - t0 < 2.5
            assert [e.target for e in store.audit_entries(end=time.monotonic() + 5)] == (
                ["k1"] if target != ":memory:" else []
            )
        finally:
            store.close()


def test_the_filters_indexes_are_made_on_an_existing_store(tmp_path: Path) -> None:
    """A store of an earlier release (its audit log without the filters' indexes) gets them at start."""
    db = tmp_path / "gov.db"
    conn = sqlite3.connect(db)
    conn.execute(
        """CREATE TABLE gov_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts DOUBLE PRECISION NOT NULL,
        actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT, before TEXT, after TEXT)"""
    )
    conn.execute("INSERT INTO gov_audit (ts, actor, action) VALUES (1, 'root', 'key.created')")
    conn.commit()
    conn.close()
    store = GovStore("sqlite", str(db))
    try:
        plan = store._query("EXPLAIN QUERY PLAN SELECT id FROM gov_audit WHERE action = ? ORDER BY id DESC", ["x"])
        assert "gov_audit_action" in str(plan), plan
        plan = store._query("EXPLAIN QUERY PLAN SELECT id FROM gov_audit WHERE actor = ? ORDER BY id DESC", ["x"])
        assert "gov_audit_actor" in str(plan), plan
        assert [e.action for e in store.audit_entries(action="key", end=time.monotonic() + 5)] == ["key.created"]
    finally:
        store.close()


def test_audit_filters_on_postgresql(pg_schema_dsn: str) -> None:
    """The same filters (and their indexes) on PostgreSQL, under a deadline."""
    store = GovStore("postgres", pg_schema_dsn)
    try:
        for actor, action in (("root", "key.created"), ("ops", "key.revoked"), ("root", "keys.x"), ("ops", "config")):
            store.audit(actor, action, None)
        end = time.monotonic() + 5
        assert [e.action for e in store.audit_entries(action="key", end=end)] == ["key.revoked", "key.created"]
        assert [e.action for e in store.audit_entries(action="key.revoked", end=end)] == ["key.revoked"]
        recent = [e.action for e in store.audit_entries(action="key", since=time.time() - 60, end=end)]
        assert recent == ["key.revoked", "key.created"]
        assert store.audit_entries(action="key", since=time.time() + 60, end=end) == []
        assert [e.action for e in store.audit_entries(actor="root", action="key", end=end)] == ["key.created"]
        assert [e.action for e in store.audit_entries(actor="ops", end=end, limit=1)] == ["config"]
        assert store.audit_entries(action="%", end=end) == []
        with pytest.raises(TimeoutError):
            store._read_until("SELECT pg_sleep(5)", [], time.monotonic() + 0.3)
        names = {r[0] for r in store._query("SELECT indexname FROM pg_indexes WHERE tablename = 'gov_audit'")}
        assert {"gov_audit_action", "gov_audit_actor"} <= names, names
    finally:
        store.close()


def test_an_action_filter_with_since_reads_no_entry_older_than_the_window(tmp_path: Path) -> None:
    """red10 F8: `action=key&since=1m` walked every old `key.*` entry of the (action, id) index,
    filtering on `ts`: 0.07 → 0.27 s at 300k entries, growing with the log. The walk now stops at
    the window's first id: the read's work does not grow with the old entries."""
    db = tmp_path / "gov.db"
    GovStore("sqlite", str(db)).close()
    _fill(db, 100_000)
    store = GovStore("sqlite", str(db))
    try:
        store.audit("root", "key.created", "kNew")
        store.audit("root", "config.api", "config")
        steps = []  # SQLite's progress callbacks, one per 1,000 virtual machine steps of the read
        store._conn.set_progress_handler(lambda: steps.append(1) and 0, 1000)
        since = time.time() - 60
        got = [(e.action, e.target) for e in store.audit_entries(since=since, action="key")]
        store._conn.set_progress_handler(None, 0)
        assert got == [("key.created", "kNew")]
        assert len(steps) < 20, len(steps)
        assert [e.target for e in store.audit_entries(since=time.time() + 60, action="key")] == []
        assert len(store.audit_entries(since=0, action="key", limit=1000)) == 1000  # old ones when asked
        store_mod._WINDOW_SCAN = 2  # a window of more entries than that: no bound, the same answer
        try:
            assert [e.target for e in store.audit_entries(since=since - 400 * 86400, action="key", limit=2)] == [
                "kNew",
                "k100000",
            ]
        finally:
            store_mod._WINDOW_SCAN = 10_000
    finally:
        store.close()
