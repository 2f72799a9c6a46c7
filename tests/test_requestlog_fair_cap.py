"""Past `request_log.max_db_mb`, one team's flood takes its own history, not every team's.

The size cap dropped the oldest rows of every team first: a key flooding the log with large
prompts pushed every other team's recent rows out (redO M3: alpha's 1,136 rows went to 0). The
rows of the tenant holding the most go first now (a team, else a key without one), so a quiet
team keeps its history. On PostgreSQL the cap applies where the config writes `max_db_mb`
(the request log had no size bound there at all), to the request log's own bytes.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import PostgresBackend, SqliteBackend
from edgeroute.requestlog import store
from edgeroute.requestlog.settings import RequestLog
from tests.governance_support import call
from tests.test_governance_keys import _proxy
from tests.test_report_queries_bounded import ROOT, _key
from tests.test_requestlog import _synthetic

PROMPT = "x" * 8000  # beta's large prompts, kept whole (`log_content: full`)


def _cfg(up: Any, ledger: dict[str, Any], max_db_mb: float) -> dict[str, Any]:
    from tests.conftest import simple_config

    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    cfg["ledger"] = {**ledger, "flush_interval": 0.1}
    cfg["request_log"] = {"log_content": "full", "max_db_mb": max_db_mb}
    return cfg


async def _rows(url: str, team: str) -> list[dict[str, Any]]:
    status, body = await call("GET", url + f"/admin/requests?since=1h&team={team}&limit=500", ROOT)
    assert status == 200, body
    return list(body["data"])


async def _send(url: str, secret: str, n: int, prompt: str) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
    try:
        for i in range(0, n, 10):
            msgs: Any = [{"role": "user", "content": prompt}]
            await asyncio.gather(
                *(client.chat.completions.create(model="m", messages=msgs) for _ in range(i, min(n, i + 10)))
            )
    finally:
        await client.close()


async def _flood_keeps_the_quiet_team(url: str) -> list[dict[str, Any]]:
    """Alpha sends 30 small requests, then beta 200 with 8 KB prompts (and as long answers: the
    mock echoes): 3.2 MB past a cap of 2 MB. Alpha's 30 stay; beta keeps its newest; returns
    beta's rows."""
    alpha = await _key(url, "alpha", "service")
    beta = await _key(url, "beta", "service")
    await _send(url, alpha["secret"], 30, "hello")
    await _send(url, beta["secret"], 200, PROMPT)
    deadline = time.monotonic() + 10
    before: list[dict[str, Any]] = []
    while True:  # the writer evicts after each batch: beta's rows fall to what the cap holds
        await asyncio.sleep(0.5)
        beta_rows = await _rows(url, "beta")
        if beta_rows == before or time.monotonic() > deadline:  # settled: every batch written
            break
        before = beta_rows
    alpha_rows = await _rows(url, "alpha")
    assert len(alpha_rows) == 30, f"alpha kept {len(alpha_rows)} of its 30 requests (beta: {len(beta_rows)})"
    assert 20 < len(beta_rows) < 150, f"beta kept {len(beta_rows)} of 200"
    return beta_rows


async def test_a_teams_flood_evicts_its_own_rows_not_a_quiet_teams(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    async with _proxy(_cfg(up, {"path": str(tmp_path / "l.db")}, 2.0)) as url:
        beta_rows = await _flood_keeps_the_quiet_team(url)
    # Beta's oldest went (its first ten, sent together), its newest stayed (its last ten); and
    # its spend, which is money, stays whole.
    conn = sqlite3.connect(tmp_path / "l.db")
    ids = [r[0] for r in conn.execute("SELECT request_id FROM spend WHERE team = 'beta' ORDER BY ts, id")]
    kept = {r["id"] for r in beta_rows}
    assert len(ids) == 200 and not kept & set(ids[:10]) and set(ids[-10:]) <= kept
    conn.close()


async def test_a_teams_flood_evicts_its_own_rows_on_postgres(start_upstream: Any, pg_schema_dsn: str) -> None:
    up = await start_upstream()
    ledger = {"backend": "postgres", "dsn": pg_schema_dsn}
    async with _proxy(_cfg(up, ledger, 2.0)) as url:
        await _flood_keeps_the_quiet_team(url)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_holdings_count_an_earlier_releases_rows_once(backend: str, tmp_path: Path, request: Any) -> None:
    """A database written before the holdings existed gets its rows counted at the first start;
    from then on the writer counts what it inserts, and a trigger what any statement deletes."""
    if backend == "sqlite":
        make: Any = lambda: SqliteBackend(tmp_path / "h.db")  # noqa: E731
    else:
        dsn = request.getfixturevalue("pg_schema_dsn")
        make = lambda: PostgresBackend(dsn)  # noqa: E731
    db = make()
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog())
    recs = _synthetic(300, time.time() - 600, random.Random(4))
    for i, r in enumerate(recs):
        r.request_id, r.team = f"h-{i}", ("alpha", "beta", None)[i % 3]
        ledger.record(r)
    ledger.flush()
    db.execute(f"DROP TABLE {store.HOLDINGS}")  # as an earlier release left it
    db.execute(f"DROP TRIGGER requests_let_go{' ON requests' if backend != 'sqlite' else ''}")
    ledger.close()
    db = make()
    totals = db.query(f"SELECT tenant, sum(n) FROM {store.HOLDINGS} GROUP BY tenant ORDER BY tenant", ())
    counted = db.query(
        "SELECT CASE WHEN team IS NOT NULL THEN 't:' || team WHEN key_id IS NOT NULL THEN 'k:' || key_id ELSE '' END,"
        " count(*) FROM requests GROUP BY 1 ORDER BY 1",
        (),
    )
    assert [(str(t), int(n)) for t, n in totals] == [(str(t), int(n)) for t, n in counted]
    # Once a minute, PostgreSQL's counts of writers gone (the fill's) are folded into a live
    # writer's: the totals stay, the table keeps a row a tenant and writer alive.
    store.prune(db, RequestLog())
    writers = {str(w) for (w,) in db.query(f"SELECT DISTINCT writer FROM {store.HOLDINGS}", ())}
    assert len(writers) == 1 and (backend == "sqlite") == (writers == {""}), writers
    again = db.query(f"SELECT tenant, sum(n) FROM {store.HOLDINGS} GROUP BY tenant ORDER BY tenant", ())
    assert [(str(t), int(n)) for t, n in again] == [(str(t), int(n)) for t, n in counted]
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog())
    for i, r in enumerate(_synthetic(30, time.time() - 60, random.Random(5))):
        r.request_id, r.team = f"more-{i}", "alpha"
        ledger.record(r)
    ledger.flush()
    alpha = db.query(f"SELECT sum(n) FROM {store.HOLDINGS} WHERE tenant = 't:alpha'", ())
    assert int(alpha[0][0]) == 130
    db.execute("DELETE FROM requests WHERE team = ?", ("alpha",))
    assert db.query(f"SELECT sum(n), sum(bytes) FROM {store.HOLDINGS} WHERE tenant = 't:alpha'", ()) == [(0, 0)]
    ledger.close()


def test_a_key_without_a_team_and_the_keyless_clients_are_tenants_too(tmp_path: Path) -> None:
    """The biggest holder goes first whatever it is: a key without a team, then (once it is
    the biggest) the keyless clients, whose rows are found by time; a team's few rows stay."""
    db = SqliteBackend(tmp_path / "k.db")
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog(max_db_mb=None))
    t0 = time.time() - 3600
    recs = _synthetic(3000, t0, random.Random(6))
    for i, r in enumerate(recs):
        # The team's rows are the oldest of all: oldest-first took them first.
        r.request_id, r.started = f"k-{i}", t0 + i
        r.team, r.key = ("quiet", "kq") if i < 100 else (None, "solo") if i % 3 else (None, None)
        ledger.record(r)
    ledger.flush()

    def count(where: str) -> int:
        return int(db.query(f"SELECT count(*) FROM requests WHERE {where}", ())[0][0])

    solo, keyless = count("key_id = 'solo'"), count("key_id IS NULL")
    assert solo > keyless > 100
    cap = store.used_bytes(db) - 300_000
    store.prune_some(db, RequestLog(max_db_mb=cap / 1024 / 1024), None)
    assert store.used_bytes(db) <= cap
    assert count("team = 'quiet'") == 100, "the quiet team's rows went"
    assert count("key_id = 'solo'") < solo and count("key_id IS NULL") == keyless
    # Tighter: `solo` falls to the keyless clients' share, then both give way, oldest first.
    cap = store.used_bytes(db) - 600_000
    store.prune_some(db, RequestLog(max_db_mb=cap / 1024 / 1024), None)
    left_solo, left_keyless = count("key_id = 'solo'"), count("key_id IS NULL")
    assert count("team = 'quiet'") == 100 and left_keyless < keyless
    assert abs(left_solo - left_keyless) < 0.2 * left_keyless, (left_solo, left_keyless)
    newest_gone = db.query(
        "SELECT max(ts) FROM spend WHERE key_id IS NULL AND request_id NOT IN (SELECT id FROM requests)", ()
    )
    oldest_kept = db.query("SELECT min(ts) FROM requests WHERE key_id IS NULL", ())
    assert newest_gone[0][0] < oldest_kept[0][0]
    ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_holdings_weigh_non_ascii_text_in_bytes(backend: str, tmp_path: Path, request: Any) -> None:
    """Holdings weigh text in UTF-8 bytes, as written and as deleted, on every database encoding:
    rows were weighed in characters as written but by SQL length() as deleted, which counts bytes
    on a SQL_ASCII PostgreSQL database, so a tenant of non-ASCII text read as holding less than it
    did (or less than nothing) and the others were evicted in its place."""
    if backend == "sqlite":
        db: Any = SqliteBackend(tmp_path / "u.db")
    else:
        db = PostgresBackend(request.getfixturevalue("pg_schema_dsn"))
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog())
    texts = ["é" * 50, "✓ done", "漢字のテキスト" * 20, "plain ascii", "mixed é ✓ 漢"]
    for i, r in enumerate(_synthetic(60, time.time() - 600, random.Random(7))):
        r.request_id, r.team = f"u-{i}", ("alpha", "beta", None)[i % 3]
        r.content_mode, r.content_request = "full", texts[i % len(texts)].encode()
        ledger.record(r)
    ledger.flush()

    def recount() -> dict[str, int]:
        """Each tenant's rows weighed in UTF-8 bytes, read back from the log."""
        got: dict[str, int] = {}
        for team, key, content, detail in db.query("SELECT team, key_id, content, detail FROM requests", ()):
            tenant = f"t:{team}" if team is not None else f"k:{key}" if key is not None else ""
            size = len((content or "").encode()) + len(detail.encode()) + store.ROW_BYTES
            got[tenant] = got.get(tenant, 0) + size
        return got

    def holdings() -> dict[str, int]:
        held = db.query(f"SELECT tenant, sum(bytes) FROM {store.HOLDINGS} GROUP BY tenant", ())
        return {str(t): int(b) for t, b in held if int(b)}

    assert any(not (c or "").isascii() for (c,) in db.query("SELECT content FROM requests", ()))
    assert holdings() == recount()
    db.execute("DELETE FROM requests WHERE team = ?", ("alpha",))  # the trigger weighs what goes
    assert holdings() == recount() and "t:alpha" not in holdings()
    ledger.close()
