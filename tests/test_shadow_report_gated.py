"""The shadow report (`GET /admin/router/shadow`) passes the operator's query gate (redU H1).

It ran on asyncio's default executor, the one the request path uses for large bodies, with no
deadline and no per-key limit, and its candidates query scanned the whole `router_shadow` table:
a viewer's flood of reports held every large chat request back for seconds. Now a key's reports
past `request_log.max_queries_per_key` get 429 `too_many_queries`, one past
`request_log.query_timeout_s` 503 `query_timeout`, a chat during the flood is not held back, and
a report over a recent window reads only that window's rows.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import simple_config
from tests.test_governance_keys import _proxy

ROOT = "tok-root-0123456789"
VIEWER = "tok-viewer-0123456789"
ROWS = 400_000  # some 5 s a report before the fix, on a shared 2-core machine
FLOOD = 24  # more reports than the default executor has threads on a small machine


def _cfg(up: Any, db: Path, timeout_s: float) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "dash": {"token": VIEWER, "role": "viewer"}}
    cfg["ledger"] = {"backend": "sqlite", "path": str(db)}
    cfg["request_log"] = {"query_timeout_s": timeout_s, "max_queries_per_key": 1}
    return cfg


def _fill(path: Path, rows: int, newest_age_s: float) -> None:
    """`rows` shadow evaluations of three candidates, one every 2 s back from `newest_age_s` ago."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        conn.execute(
            """WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO router_shadow (request_id, candidate, ts, model, running_route, candidate_route,
                running_cost_usd, candidate_cost_usd, cost_usd)
            SELECT printf('r-%07d', i), 'cand@' || (i % 3), ? - i * 2.0, 'm', 'm', 'm', 0.001, 0.002, 0.001
            FROM n""",
            (rows - 1, time.time() - newest_age_s),
        )
        conn.commit()
    finally:
        conn.close()


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    async with s.get(url, headers={"Authorization": f"Bearer {VIEWER}"}) as r:
        return r.status, await r.json(), time.monotonic() - t0


async def test_a_viewers_flood_of_shadow_reports_is_gated_and_the_chat_goes_on(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    async with _proxy(_cfg(up, db, timeout_s=0.3)) as url:
        await asyncio.to_thread(_fill, db, ROWS // 2, 0)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ROOT, max_retries=0)
        big = "word " * 40_000  # 200 KB: its body is read off the event loop, on the default executor
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            reports = [
                asyncio.create_task(_get(s, url + f"/admin/router/shadow?since=30d&candidate=cand@{i % 3}"))
                for i in range(FLOOD)
            ]
            await asyncio.sleep(0.1)  # the reports are in
            t0 = time.monotonic()
            answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": big}])
            chat_s = time.monotonic() - t0
            answers = await asyncio.gather(*reports)
        await client.close()
    assert answer.choices[0].message.content
    codes = sorted({(st, b["error"]["code"]) for st, b, _ in answers if st != 200})
    # One report at a time for the key; the others wait briefly for its slot, then 429.
    assert (429, "too_many_queries") in codes, [(st, b.get("error")) for st, b, _ in answers]
    assert set(codes) <= {(429, "too_many_queries"), (503, "query_timeout")}, codes
    refused = next(b for st, b, _ in answers if st == 429)
    assert "in flight" in refused["error"]["message"] and refused["error"]["type"], refused
    assert max(t for *_, t in answers) < 3.0, sorted(round(t, 2) for *_, t in answers)
    assert chat_s < 1.5, f"the 200 KB chat took {chat_s:.2f} s during the flood"


async def test_a_recent_window_reads_only_its_rows(start_upstream, tmp_path: Path) -> None:
    """A month of evaluations older than the window: the default 24 h report is quick (the
    window has an index), well within a tight deadline; the whole month is past it (503)."""
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    async with _proxy(_cfg(up, db, timeout_s=0.05)) as url:
        await asyncio.to_thread(_fill, db, ROWS, 2 * 86400)
        async with aiohttp.ClientSession() as s:
            status, body, _ = await _get(s, url + "/admin/router/shadow?candidate=cand@0")
            assert status == 200 and body["requests"] == 0 and body["candidates"] == [], body
            status, body, _ = await _get(s, url + "/admin/router/shadow?since=30d&candidate=cand@0")
            assert status == 503 and body["error"]["code"] == "query_timeout", body
            assert "longer than 0.05 s" in body["error"]["message"], body
