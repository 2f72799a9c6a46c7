"""Shadow evaluation of a candidate router end to end: SDK requests through a proxy whose
policy runs one router while `learning.candidate_router` names another; the candidate's
choices are recorded off the request path beside the request log, and the report
(`GET /admin/router/shadow`, `edgeroute router shadow`) gives agreement, both choices'
estimated cost and the quality the feedback says, before the candidate is switched on."""

from __future__ import annotations

import asyncio
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
from edgeroute.core import ConfigError
from edgeroute.server import create_app
from tests.test_cost_support import cost_proxy
from tests.test_learn_from_log import CHAT, SUMS
from tests.test_selection import STRONG_OUT, WEAK_OUT, config

np = pytest.importorskip("numpy")


def _routers(tmp_path: Path) -> tuple[Path, Path]:
    """The running router (sums to the strong model, chat to the weak one) and a candidate
    that sends everything to the strong model (a prompt-blind prior)."""
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S

    rows = [{"prompt": p, "model": m, "score": 0.0 if m == WEAK_OUT and p in SUMS else 1.0, "cost_usd": c}
            for p in SUMS + CHAT for m, c in ((STRONG_OUT, 0.01), (WEAK_OUT, 0.001))]  # fmt: skip
    running = tmp_path / "running.erlm"
    running.write_bytes(R.train_router(R.Outcomes.from_rows(rows)).to_bytes())
    blind = R.Outcomes([p for p in SUMS], [STRONG_OUT, WEAK_OUT], np.tile([0.9, 0.1], (len(SUMS), 1)), [0.01, 0.001])
    candidate = tmp_path / "candidate.erlm"
    candidate.write_bytes(S.prior_model(blind, R.ROUTER_FEATURIZER).to_bytes())
    return running, candidate


def _cfg(tmp_path: Path, strong: Any, weak: Any, running: Path, candidate: Path) -> dict[str, Any]:
    return config(
        strong,
        weak,
        threshold=0.5,
        ledger={"path": str(tmp_path / "log.db"), "flush_interval": 0.05},
        learning={"router_model": str(running), "candidate_router": {"router_model": str(candidate)}},
    )


def _shadow_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeroute", "router", "shadow", "-c", "edgeroute.yaml", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)


async def _until(s: aiohttp.ClientSession, url: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        async with s.get(url + "/admin/router/shadow") as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
        # the feedback rows may land a batch after the choices: wait for both
        if (body["requests"] >= n and body["quality"]["rated"] >= n) or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.1)


async def test_candidate_router_is_evaluated_on_live_traffic(start_upstream: Any, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    running, candidate = _routers(tmp_path)
    cfg = _cfg(tmp_path, strong, weak, running, candidate)
    (tmp_path / "edgeroute.yaml").write_text(yaml.safe_dump(cfg))
    sums, chat = SUMS[:6], CHAT[:6]
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
        for i, prompt in enumerate(sums + chat):
            if i % 2:
                a = await ant.messages.with_raw_response.create(
                    model="auto", max_tokens=20, messages=[{"role": "user", "content": prompt}]
                )
                route, rid = a.headers["x-edgeroute-route"], a.headers["x-request-id"]
            else:
                o = await oai.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": prompt}]
                )
                route, rid = o.headers["x-edgeroute-route"], o.headers["x-request-id"]
            # The candidate never changes where a request goes: the running router's choice.
            assert route == ("strong" if prompt in sums else "weak")
            score = 1.0 if prompt in sums else 0.5
            async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid, "score": score}) as r:
                assert r.status == 200
        # Not policy-routed: a model asked for by name is not the router's choice, not evaluated.
        await oai.chat.completions.create(model="weak", messages=[{"role": "user", "content": "hi"}])
        body = await _until(s, proxy.url, 12)
        async with s.get(proxy.url + "/admin/router/shadow?bogus=1") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "bogus"
        async with s.get(proxy.url + "/admin/router/shadow?since=soon") as r:
            assert r.status == 400
    assert body["candidate"].startswith("candidate.erlm@") and body["requests"] == 12
    assert body["agreement"] == 0.5  # the sums: both send them to the strong model
    pairs = {(p["running_route"], p["candidate_route"]): p for p in body["pairs"]}
    assert set(pairs) == {("strong", "strong"), ("weak", "strong")}
    assert pairs[("weak", "strong")]["requests"] == 6 and pairs[("weak", "strong")]["mean_score"] == 0.5
    cost = body["cost"]
    # The candidate prices the chat turns at the strong model's price: dearer, never cheaper.
    assert cost["candidate_usd"] > cost["running_usd"] > 0 and cost["candidate_vs_running"] > 1
    assert cost["paid_usd"] == pytest.approx(cost["running_usd"], rel=1e-6)
    q = body["quality"]
    assert q["rated"] == 12 and q["running"] == 0.75
    # Agreeing sums keep their 1.0; the chat turns the candidate sends to the strong route are
    # estimated by that route's rated requests (1.0 here).
    assert q["candidate_estimate"] == 1.0 and q["estimated_disagreements"] == 6
    assert body["evaluator"] == {"evaluated": 12, "dropped": 0, "failed": 0}

    out = _shadow_cli(["--format", "json"], tmp_path)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert {k: cli[k] for k in ("candidate", "requests", "agreement", "cost", "quality")} == {
        k: body[k] for k in ("candidate", "requests", "agreement", "cost", "quality")
    }
    out = _shadow_cli([], tmp_path)
    assert out.returncode == 0 and "agreement with the running router: 50.0 %" in out.stdout, out.stdout
    with sqlite3.connect(tmp_path / "log.db") as c:
        assert c.execute("SELECT COUNT(DISTINCT request_id) FROM router_shadow").fetchone() == (12,)


def test_an_unreadable_or_foreign_candidate_fails_at_start(tmp_path: Path) -> None:
    cfg = config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    cfg["learning"] = {"candidate_router": {"router_model": str(tmp_path / "missing.erlm")}}
    with pytest.raises(ConfigError, match=r"candidate_router.*cannot read"):
        create_app(config_mod.parse(cfg, "test.yaml"), "test.yaml")
    (tmp_path / "junk.erlm").write_bytes(b"not a model")
    cfg["learning"] = {"candidate_router": {"router_model": str(tmp_path / "junk.erlm")}}
    with pytest.raises(ConfigError, match="candidate_router"):
        create_app(config_mod.parse(cfg, "test.yaml"), "test.yaml")
    cfg["learning"] = {"candidate_router": {"router_model": "x.erlm", "percent": 0}}
    with pytest.raises(config_mod.ConfigError):
        config_mod.parse(cfg, "test.yaml")


def test_waiting_requests_are_bounded_and_dropped_ones_counted(tmp_path: Path, monkeypatch: Any) -> None:
    """A stalled worker cannot make the request path hold bodies without end."""
    from edgeroute.accounting import RequestRecord
    from edgeroute.cost.ledger import Ledger, SqliteBackend
    from edgeroute.requestlog.settings import RequestLog
    from edgeroute.router_shadow import evaluator
    from edgeroute.state import Live

    running, candidate = _routers(tmp_path)
    cfg = config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", learning={"router_model": str(running)})
    live = Live.build(config_mod.parse(cfg, "test.yaml"), "test.yaml")
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": CHAT[0]}]}).encode()
    decision = live.router.decide(body)
    assert decision.policy is not None
    ledger = Ledger(SqliteBackend(tmp_path / "log.db"), flush_interval=60, request_log=RequestLog())
    ev = evaluator.Evaluator("c", candidate.read_bytes(), 100, ledger)
    monkeypatch.setattr(evaluator, "MAX_WAITING", 3)
    for i in range(5):
        rec = RequestRecord(request_id=f"r{i}", started=time.time(), model="auto", route=decision.route, status=200)
        ev.observe(live, body, decision, rec, None)
    assert ev.dropped == 2 and ev.evaluate_waiting() == 3
    monkeypatch.setattr(evaluator, "MAX_WAITING_BYTES", len(body) * 2)
    for i in range(5):
        rec = RequestRecord(request_id=f"s{i}", started=time.time(), model="auto", route=decision.route, status=200)
        ev.observe(live, body, decision, rec, None)
    assert ev.dropped == 2 + 3 and ev.evaluate_waiting() == 2
    ledger.flush()
    assert ledger.backend.query("SELECT COUNT(*) FROM router_shadow WHERE candidate_route = 'strong'", []) == [(5,)]
    ledger.close()


def test_the_report_on_postgresql_from_a_second_instance() -> None:
    """Choices recorded by one instance's ledger are in another instance's report."""
    from edgeroute.cost.ledger import Ledger, PostgresBackend
    from edgeroute.requestlog import outcomes
    from edgeroute.requestlog.settings import RequestLog
    from edgeroute.router_shadow import report
    from tests.test_cost_ledger import _pg_reset
    from tests.test_cost_support import require_postgres

    dsn = require_postgres()
    _pg_reset(dsn)
    ledger = Ledger(PostgresBackend(dsn), flush_interval=60, request_log=RequestLog())
    now = time.time()
    for i in range(4):  # two agree (strong), two the candidate would send to the weak route
        cand = "strong" if i < 2 else "weak"
        ledger.outcome(
            outcomes.ROUTER_SHADOW, (f"r{i}", "c@1", now, "auto", "strong", cand, 0.01, 0.01 if i < 2 else 0.001, 0.01)
        )
        ledger.outcome(outcomes.FEEDBACK, (f"r{i}", now, 1.0 if i % 2 else 0.0, None))
    ledger.outcome(
        outcomes.ROUTER_SHADOW, ("r0", "c@1", now, "auto", "strong", "weak", 9.0, 9.0, 9.0)
    )  # a replay: ignored
    ledger.close()
    other = PostgresBackend(dsn)
    body = report.build(other, {}, "c@1", now + 1)
    assert body["requests"] == 4 and body["agreement"] == 0.5
    assert body["cost"] == {"running_usd": 0.04, "candidate_usd": 0.022, "candidate_vs_running": 0.55, "paid_usd": 0.04}
    # no rated request reached the weak route: those two disagreements cannot be estimated
    assert body["quality"] == {
        "rated": 4,
        "running": 0.5,
        "candidate_estimate": 0.5,
        "estimated_disagreements": 0,
        "unestimated_disagreements": 2,
    }
    assert report.build(other, {"candidate": "other"}, "c@1", now + 1)["requests"] == 0
    other.close()
