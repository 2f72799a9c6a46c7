"""`router train --from-log` end to end: SDK requests through a proxy with the request log
keeping content, feedback posted to `/v1/feedback` (stored beside the records, joined by
request id, refused for another key's request), a router trained from the log by the CLI,
then loaded by `router eval` and by a proxy that routes with it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.accounting import RequestRecord
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import PostgresBackend, SqliteBackend
from edgeroute.learn import from_log
from edgeroute.requestlog import outcomes
from edgeroute.requestlog.settings import RequestLog
from tests.conftest import Upstream
from tests.test_cost_support import cost_proxy
from tests.test_selection import STRONG_OUT, WEAK_OUT, config

pytest.importorskip("numpy")

# Two kinds of prompt with different winners: the weak model fails the sums, both answer chat.
SUMS = [f"Compute {a} * {a + 7} - {3 * a} and show the arithmetic steps" for a in range(13, 33)]
CHAT = [f"Hello there, my friend {n}! How was your weekend trip, and what did you enjoy?" for n in range(20)]


def _score(prompt: str, route: str) -> float:
    return 0.0 if route == "weak" and prompt in SUMS else 1.0


def _cfg(strong: Upstream, weak: Upstream, db: Path, content: str = "full", **extra: Any) -> dict[str, Any]:
    return config(
        strong,
        weak,
        threshold=0.5,
        ledger={"path": str(db), "flush_interval": 0.05},
        request_log={"log_content": content},
        **extra,
    )


def _router(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", "router", *args], capture_output=True, text=True, cwd=cwd, timeout=240
    )


async def _ask(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic, prompt: str, route: str, i: int) -> str:
    """One request as a user sends it (OpenAI and Anthropic SDKs in turn); the proxy's request id."""
    if i % 2:
        a = await ant.messages.with_raw_response.create(
            model=route, max_tokens=20, messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        )
        return a.headers["x-request-id"]
    o = await oai.chat.completions.with_raw_response.create(model=route, messages=[{"role": "user", "content": prompt}])
    return o.headers["x-request-id"]


async def _feedback(s: aiohttp.ClientSession, url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with s.post(url + "/v1/feedback", json=body, headers=headers) as r:
        return r.status, await r.json()


async def test_train_from_log_end_to_end(start_upstream: Any, start_proxy: Any, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    db = tmp_path / "log.db"
    cfg = _cfg(strong, weak, db)
    (tmp_path / "edgeroute.yaml").write_text(yaml.safe_dump(cfg))
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
        i = 0
        for prompt in SUMS + CHAT:
            for route in ("strong", "weak"):
                rid = await _ask(oai, ant, prompt, route, i)
                i += 1
                # The first score is replaced by the second: the last word counts.
                status, body = await _feedback(s, proxy.url, {"request_id": rid, "score": 0.5})
                assert status == 200 and body["stored"] is True and body["route"] == route, body
                status, _ = await _feedback(s, proxy.url, {"request_id": rid, "score": _score(prompt, route)})
                assert status == 200
        # Hostile and careless input: the API's error format, the right status, nothing stored.
        for bad in ({"request_id": rid, "score": 1.5}, {"request_id": rid, "score": "NaN"}, {"score": 1}, [1]):
            status, body = await _feedback(s, proxy.url, bad)
            assert status == 400 and body["error"]["message"], (bad, body)
        status, body = await _feedback(s, proxy.url, {"request_id": "req_nope", "score": 1})
        assert status == 404 and body["error"]["code"] == "unknown_request_id"
        status, body = await _feedback(s, proxy.url, {"request_id": "x" * 300, "score": 1})
        assert status == 400
    n = len(SUMS + CHAT) * 2
    with sqlite3.connect(db) as c:
        scores = dict(c.execute("SELECT request_id, score FROM feedback").fetchall())
    assert len(scores) == n and set(scores.values()) == {0.0, 1.0}

    out = tmp_path / "from-log.erlm"
    exported = tmp_path / "rows.jsonl"
    r = _router(
        [
            "train",
            "--from-log",
            "-c",
            "edgeroute.yaml",
            "--out",
            str(out),
            "--export-outcomes",
            str(exported),
            "--inner-folds",
            "2",
            "--outer-folds",
            "0",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert f"{n} rated request(s) in the request log, {n} usable" in r.stdout
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert {row["model"] for row in rows} == {STRONG_OUT, WEAK_OUT}  # routes named as the policy's outputs
    assert {row["prompt"] for row in rows} == {p + "\n" for p in SUMS + CHAT}  # the user text the core reads
    assert "chose linear" in r.stdout, r.stdout  # the text model beats the prior on this data

    r = _router(["eval", "--router", str(out), "--outcomes", str(exported)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "router" in r.stdout and "APGR" in r.stdout

    # The proxy loads the router and sends each kind where the log said it does well.
    served = await start_proxy(config(strong, weak, threshold=0.5, learning={"router_model": str(out)}))
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    for prompt, want in (("Compute 41 * 48 - 123 and show the arithmetic steps", "strong"),
                         ("Hello there, my friend! How was your weekend trip?", "weak")):  # fmt: skip
        raw = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}]
        )
        assert raw.headers["x-edgeroute-route"] == want, raw.headers.get("x-edgeroute-explain")


async def test_a_log_without_content_says_what_to_enable(start_upstream: Any, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    cfg = _cfg(strong, weak, tmp_path / "log.db", content="none")
    (tmp_path / "edgeroute.yaml").write_text(yaml.safe_dump(cfg))
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        raw = await oai.chat.completions.with_raw_response.create(
            model="weak", messages=[{"role": "user", "content": "hi"}]
        )
        status, _ = await _feedback(s, proxy.url, {"request_id": raw.headers["x-request-id"], "score": 1})
        assert status == 200
    r = _router(["train", "--from-log", "-c", "edgeroute.yaml", "--out", "r.erlm"], tmp_path)
    assert r.returncode == 2
    assert "1 without stored content" in r.stdout
    assert "log_content" in r.stderr and "private by default" in r.stderr
    assert not (tmp_path / "r.erlm").exists()


async def test_feedback_only_for_the_callers_own_requests(start_upstream: Any, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    keys = {"alice": {"token": "sk-alice-0123456789"}, "bob": {"token": "sk-bob-0123456789"},
            "boss": {"token": "sk-boss-0123456789", "role": "admin"}}  # fmt: skip
    cfg = _cfg(strong, weak, tmp_path / "log.db", keys=keys)
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        alice = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=keys["alice"]["token"], max_retries=0)
        raw = await alice.chat.completions.with_raw_response.create(
            model="weak", messages=[{"role": "user", "content": "hi"}]
        )
        rid = raw.headers["x-request-id"]
        status, body = await _feedback(s, proxy.url, {"request_id": rid, "score": 0}, keys["bob"]["token"])
        assert status == 404 and body["error"]["code"] == "unknown_request_id"  # existence not told
        status, _ = await _feedback(s, proxy.url, {"request_id": rid, "score": 1}, None)
        assert status == 401
        status, body = await _feedback(s, proxy.url, {"request_id": rid, "score": 0.75}, keys["alice"]["token"])
        assert status == 200 and body["stored"]
        status, body = await _feedback(s, proxy.url, {"request_id": rid, "score": 0.5}, keys["boss"]["token"])
        assert status == 200
    with sqlite3.connect(tmp_path / "log.db") as c:
        assert c.execute("SELECT score, key_id FROM feedback").fetchall() == [(0.5, "boss")]


def _logged(rid: str, route: str, prompt: str, started: float) -> RequestRecord:
    body = json.dumps({"model": route, "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": prompt}]})  # fmt: skip
    return RequestRecord(request_id=rid, started=started, model=route, route=route, status=200, outcome="ok",
                         cost_usd=0.001, content_mode="full", content_request=body.encode())  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_feedback_rows_join_the_log_on_both_backends(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Feedback rides the ledger's batches (the last score wins), joins its request by id,
    and goes with the request log's retention; the same on SQLite and PostgreSQL."""
    if backend == "postgres":
        dsn = request.getfixturevalue("pg_schema_dsn")
        db: Any = PostgresBackend(dsn)
    else:
        db = SqliteBackend(tmp_path / "log.db")
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog(retention_days=1))
    now = time.time()
    ledger.record(_logged("old", "weak", "an old question", now - 3 * 86400))
    ledger.record(_logged("r1", "weak", "what is 2+2?", now))
    ledger.record(_logged("r2", "strong", "and 3+3?", now))
    ledger.outcome(outcomes.FEEDBACK, ("old", now - 3 * 86400, 1.0, None))
    ledger.outcome(outcomes.FEEDBACK, ("r1", now, 0.2, None))
    ledger.outcome(outcomes.FEEDBACK, ("r1", now + 1, 0.9, "k"))  # a later word on the same request
    ledger.outcome(outcomes.FEEDBACK, ("unlogged", now, 1.0, None))  # joins nothing: not trained on
    ledger.flush()
    cfg = config_mod.parse(config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), "test.yaml")
    found = from_log.read(db, cfg)
    assert found.rated == 2 and found.explain().startswith("2 rated request(s) in the request log, 2 usable")
    ledger.maintain(now)  # retention: a day
    found = from_log.read(db, cfg)
    # r2 has no feedback: not a row; the system message is not the user's text
    assert [(r["prompt"], r["model"], r["score"]) for r in found.rows] == [("what is 2+2?\n", WEAK_OUT, 0.9)]
    assert db.query("SELECT COUNT(*) FROM feedback", []) == [(2,)]  # the old one pruned, "unlogged" kept a day
    ledger.close()
