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
from edgeroute.bench.faults import FaultUpstream
from edgeroute.bench.upstream import UpstreamOptions
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer
from tests.test_cost_support import cost_proxy
from tests.test_learn_from_log import CHAT, SUMS
from tests.test_selection import STRONG_OUT, WEAK_OUT, config, msg

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


def _cfg(tmp_path: Path, strong: Any, weak: Any, running: Path, candidate: Path | None) -> dict[str, Any]:
    return config(
        strong,
        weak,
        threshold=0.5,
        ledger={"path": str(tmp_path / "log.db"), "flush_interval": 0.05},
        learning={"router_model": str(running)}
        | ({"candidate_router": {"router_model": str(candidate)}} if candidate is not None else {}),
    )


def _shadow_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeroute", "router", "shadow", "-c", "edgeroute.yaml", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)


async def _until(s: aiohttp.ClientSession, url: str, n: int, rated: int | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        async with s.get(url + "/admin/router/shadow") as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
        # the feedback rows may land a batch after the choices: wait for both
        if (body["requests"] >= n and body["quality"]["rated"] >= (n if rated is None else rated)) or (
            time.monotonic() > deadline
        ):
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


async def test_streamed_answers_are_evaluated_once_complete_and_never_when_broken(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The candidate sees streamed answers too, from the relay once the stream has ended cleanly
    (costed by the stream's usage); a stream the upstream breaks is never counted a success."""
    strong = await start_upstream()
    weak = FaultUpstream(UpstreamOptions(tokens=8))
    await weak.start()
    running, candidate = _routers(tmp_path)
    cfg = _cfg(tmp_path, strong, weak.url, running, candidate)
    sums, chat = SUMS[:3], CHAT[:3]
    streamed: dict[str, str] = {}
    try:
        async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)

            async def stream(prompt: str) -> tuple[str, str, list[Any]]:
                raw = await oai.chat.completions.with_raw_response.create(
                    model="auto", messages=msg(prompt), stream=True, stream_options={"include_usage": True}
                )
                chunks = [c async for c in raw.parse()]
                return raw.headers["x-request-id"], raw.headers["x-edgeroute-route"], chunks

            for prompt in sums + chat:
                rid, route, chunks = await stream(prompt)
                streamed[rid] = route
                assert route == ("strong" if prompt in sums else "weak")
                # The client's stream is whole: text, one finish, its usage last.
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
            weak.set_mode("reset", count=1, after=3)  # the next weak stream breaks after 3 chunks
            raw = await oai.chat.completions.with_raw_response.create(model="auto", messages=msg(CHAT[3]), stream=True)
            broken = raw.headers["x-request-id"]
            with pytest.raises(openai.APIError, match="incomplete"):
                async for _ in raw.parse():
                    pass
            rid, _, _ = await stream(CHAT[4])  # queued after the broken one would have been
            streamed[rid] = "weak"
            # Anthropic's stream format from the same relay.
            ant = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
            araw = await ant.messages.with_raw_response.create(
                model="auto", max_tokens=20, messages=[{"role": "user", "content": SUMS[3]}], stream=True
            )
            events = [e.type async for e in await araw.parse()]
            assert events[0] == "message_start" and events[-1] == "message_stop"
            streamed[araw.headers["x-request-id"]] = "strong"
            body = await _until(s, proxy.url, len(streamed), rated=0)
    finally:
        await weak.stop()
    assert body["requests"] == len(streamed) == 8
    assert body["evaluator"] == {"evaluated": 8, "dropped": 0, "failed": 0}
    assert body["agreement"] == 0.5  # the sums: the candidate sends everything to the strong model
    pairs = {(p["running_route"], p["candidate_route"]): p["requests"] for p in body["pairs"]}
    assert pairs == {("strong", "strong"): 4, ("weak", "strong"): 4}
    cost = body["cost"]
    # Priced from the streams' own usage: the chat turns at the strong price cost the candidate more.
    assert cost["candidate_usd"] > cost["running_usd"] > 0
    assert cost["paid_usd"] == pytest.approx(cost["running_usd"], rel=1e-6)
    with sqlite3.connect(tmp_path / "log.db") as c:
        shadowed = dict(c.execute("SELECT request_id, running_route FROM router_shadow").fetchall())
        outcome = c.execute("SELECT outcome FROM requests WHERE id = ?", (broken,)).fetchone()
    assert shadowed == streamed and broken not in shadowed
    assert outcome == ("stream_interrupted",)


def test_an_unreadable_or_foreign_candidate_never_stops_the_server(tmp_path: Path) -> None:
    """A shadow evaluation must not be why a server cannot (re)start: it starts without the
    candidate and says why (the report's `candidate_router`, the log, /metrics)."""
    from edgeroute.router_shadow.evaluator import CandidateSlot
    from edgeroute.shadow import CANDIDATE_ROUTER

    base = config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", ledger={"path": str(tmp_path / "log.db")})
    (tmp_path / "junk.erlm").write_bytes(b"not a model")
    for name, why in (("missing.erlm", "cannot read"), ("junk.erlm", "junk.erlm")):
        cfg = {**base, "learning": {"candidate_router": {"router_model": str(tmp_path / name)}}}
        slot = create_app(config_mod.parse(cfg, "test.yaml"), "test.yaml")[CANDIDATE_ROUTER]
        assert isinstance(slot, CandidateSlot) and slot.current is None
        assert slot.status()["loaded"] is None and why in slot.status()["error"] and slot.load_failures == 1
    cfg = {**base, "learning": {"candidate_router": {"router_model": "x.erlm", "percent": 0}}}
    with pytest.raises(config_mod.ConfigError):
        config_mod.parse(cfg, "test.yaml")


def test_waiting_requests_are_bounded_and_dropped_ones_counted(tmp_path: Path, monkeypatch: Any) -> None:
    """A stalled worker cannot make the request path hold bodies without end."""
    from edgeroute.accounting import RequestRecord
    from edgeroute.cost.ledger import Ledger
    from edgeroute.cost.ledger_store import SqliteBackend
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


def test_the_report_on_postgresql_from_a_second_instance(pg_schema_dsn: str) -> None:
    """Choices recorded by one instance's ledger are in another instance's report."""
    from edgeroute.cost.ledger import Ledger
    from edgeroute.cost.ledger_store import PostgresBackend
    from edgeroute.requestlog import outcomes
    from edgeroute.requestlog.settings import RequestLog
    from edgeroute.router_shadow import report

    dsn = pg_schema_dsn
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


async def test_the_candidate_follows_reloads_and_rollbacks(start_upstream: Any, tmp_path: Path) -> None:
    """`learning.candidate_router` added, retrained (new bytes under the same name), broken,
    removed and rolled back to, each without a restart; a broken candidate file never stops
    the rest of a reload, leaves the previous candidate running and says why."""
    strong, weak = await start_upstream(), await start_upstream()
    running, candidate = _routers(tmp_path)
    prior_bytes = candidate.read_bytes()
    path = tmp_path / "edgeroute.yaml"
    cfg = _cfg(tmp_path, strong, weak, running, None)
    path.write_text(yaml.safe_dump(cfg))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)))
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    turns = iter(CHAT)  # the running router sends chat to the weak route; the prior sends all to the strong one

    async def traffic(n: int) -> None:
        for _ in range(n):
            await oai.chat.completions.create(model="auto", messages=msg(next(turns)))

    async def get(s: aiohttp.ClientSession, what: str) -> tuple[int, Any]:
        async with s.get(url + what) as r:
            return r.status, (await r.json() if what.startswith("/admin") else await r.text())

    async def reload(s: aiohttp.ClientSession) -> dict[str, Any]:
        path.write_text(yaml.safe_dump(cfg))
        async with s.post(url + "/admin/reload") as r:
            body: dict[str, Any] = await r.json()
            assert r.status == 200, body
            return body

    def metric(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    try:
        async with aiohttp.ClientSession() as s:
            await traffic(2)
            status, body = await get(s, "/admin/router/shadow")
            assert status == 400 and "no candidate router is configured" in body["error"]["message"]

            # Added by a reload.
            cfg["learning"]["candidate_router"] = {"router_model": str(candidate)}
            await reload(s)
            await traffic(3)
            body = await _until(s, url, 3, rated=0)
            first = body["candidate"]
            assert first.startswith("candidate.erlm@") and body["requests"] == 3 and body["agreement"] == 0
            assert body["candidate_router"] == {"loaded": first, "error": None, "load_failures": 0}

            # Retrained in place (the config unchanged): another candidate, told apart by its bytes.
            candidate.write_bytes(running.read_bytes())
            await reload(s)
            await traffic(3)
            body = await _until(s, url, 3, rated=0)
            second = body["candidate"]
            assert second.startswith("candidate.erlm@") and second != first
            assert body["requests"] == 3 and body["agreement"] == 1.0  # it is the running router
            assert {c["candidate"]: c["requests"] for c in body["candidates"]} == {first: 3, second: 3}

            # Broken, in the same reload as another change: the change applies, the last good
            # candidate goes on, and the report, the log and /metrics say why.
            candidate.write_bytes(b"not a model")
            cfg["models"]["m2"] = {"deployments": ["small"]}
            assert "m2" in (await reload(s))["models"]
            await traffic(2)
            body = await _until(s, url, 5, rated=0)
            assert body["candidate"] == second and body["requests"] == 5
            st = body["candidate_router"]
            assert st["loaded"] == second and st["load_failures"] == 1 and "candidate.erlm" in st["error"]
            _, text = await get(s, "/metrics")
            assert metric(text, "edgeroute_candidate_router_load_failed") == 1
            assert metric(text, "edgeroute_candidate_router_loaded") == 1
            assert metric(text, "edgeroute_candidate_router_load_failures_total") == 1

            # Removed: nothing more is evaluated; the report still reads the last one logged.
            del cfg["learning"]["candidate_router"]
            await reload(s)
            await traffic(2)
            _, body = await get(s, "/admin/router/shadow")
            assert body["candidate_router"] == {"loaded": None, "error": None, "load_failures": 1}
            assert "evaluator" not in body and body["candidate"] == second
            _, text = await get(s, "/metrics")
            assert metric(text, "edgeroute_candidate_router_loaded") == 0
            assert metric(text, "edgeroute_candidate_router_load_failed") == 0

            # Rolled back to the version that named it, with the first file's bytes back: the first candidate.
            candidate.write_bytes(prior_bytes)
            _, versions = await get(s, "/admin/config/versions")
            with_first = min(v["version"] for v in versions["versions"] if v["source"] == "reload")
            async with s.post(url + "/admin/config/rollback", json={"version": with_first}) as r:
                assert r.status == 200, await r.text()
            await traffic(1)
            body = await _until(s, url, 4, rated=0)
            assert body["candidate"] == first and body["requests"] == 4
            assert body["candidate_router"]["loaded"] == first

            # The running router's own file still takes a restart.
            cfg["learning"]["router_model"] = str(candidate)
            path.write_text(yaml.safe_dump(cfg))
            async with s.post(url + "/admin/reload") as r:
                assert r.status == 400 and "learning: changed" in await r.text()
    finally:
        await oai.close()
        await server.close()  # the ledger's last flush: every choice made is written
    with sqlite3.connect(tmp_path / "log.db") as c:
        counts = dict(c.execute("SELECT candidate, COUNT(*) FROM router_shadow GROUP BY candidate").fetchall())
    assert counts == {first: 4, second: 5}  # none while no candidate was configured


async def test_the_candidate_is_asked_with_the_requests_tags(start_upstream: Any, tmp_path: Path) -> None:
    """A rule on a request tag (`confidential` kept to deployments tagged `privacy:high`) holds
    for the candidate's choice as for the running router's: asked without the tags, the
    candidate would be credited with a cheap route the request may not take."""
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S

    strong, weak = await start_upstream(), await start_upstream()
    running, _ = _routers(tmp_path)
    cheap = R.Outcomes(list(SUMS), [STRONG_OUT, WEAK_OUT], np.tile([0.1, 0.9], (len(SUMS), 1)), [0.01, 0.001])
    candidate = tmp_path / "cheap.erlm"
    S.prior_model(cheap, R.ROUTER_FEATURIZER).save(candidate)  # everything to the weak route
    cfg = _cfg(tmp_path, strong, weak, running, candidate)
    cfg["deployments"]["big"]["tags"] = ["privacy:high"]
    cfg["rules"] = [
        {"name": "confidential", "when": {"tags": ["confidential"]}, "then": {"require_tags": ["privacy:high"]}}
    ]
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        for prompt in SUMS[:3]:
            raw = await oai.chat.completions.with_raw_response.create(
                model="auto", messages=msg(prompt), extra_headers={"x-edgeroute-tags": "confidential"}
            )
            assert raw.headers["x-edgeroute-deployment"] == "big"
        await oai.chat.completions.create(model="auto", messages=msg(CHAT[0]))  # untagged
        body = await _until(s, proxy.url, 4, rated=0)
    assert body["requests"] == 4, (body["evaluator"], body["pairs"])
    pairs = {(p["running_route"], p["candidate_route"]): p["requests"] for p in body["pairs"]}
    # the tagged sums: the candidate's weak route is not allowed them; the chat turn: weak by both
    assert pairs == {("strong", "strong"): 3, ("weak", "weak"): 1}, body["pairs"]


def test_the_candidate_decides_with_the_prices_of_the_requests_time(tmp_path: Path) -> None:
    """Time-of-day price windows: the candidate decides each request with the prices in force
    when it ran (the running router did), not those of when the candidate was compiled."""
    from edgeroute.accounting import RequestRecord
    from edgeroute.cost.ledger import Ledger
    from edgeroute.cost.ledger_store import SqliteBackend
    from edgeroute.learn import router as R
    from edgeroute.learn import selection as S
    from edgeroute.requestlog.settings import RequestLog
    from edgeroute.router_shadow import evaluator
    from edgeroute.state import Live

    running, _ = _routers(tmp_path)
    # A candidate that finds both models good enough: it picks the cheaper one at the time.
    both = R.Outcomes(list(SUMS), [STRONG_OUT, WEAK_OUT], np.tile([0.9, 0.9], (len(SUMS), 1)), [0.01, 0.001])
    candidate = S.prior_model(both, R.ROUTER_FEATURIZER).to_bytes()
    cfg = config(
        "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", threshold=0.5, learning={"router_model": str(running)}
    )
    # The small model costs 100 times as much from 12:00 to 13:00 UTC: the big one is cheaper then.
    window = {"start": "12:00", "end": "13:00", "multiplier": 100}
    cfg["deployments"]["small"]["price"]["windows"] = [window]
    live = Live.build(config_mod.parse(cfg, "test.yaml"), "test.yaml")
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": CHAT[0]}]}).encode()
    decision = live.router.decide(body)
    ledger = Ledger(SqliteBackend(tmp_path / "log.db"), flush_interval=60, request_log=RequestLog())
    ev = evaluator.Evaluator("c", candidate, 100, ledger)
    day = 86_400 * 20_000  # a midnight, UTC
    for rid, at in (("in-window", day + 12.5 * 3600), ("off-peak", day + 0.5 * 3600), ("in-again", day + 12.9 * 3600)):
        rec = RequestRecord(request_id=rid, started=at, model="auto", route=decision.route, status=200)
        ev.observe(live, body, decision, rec, None)
    assert ev.evaluate_waiting() == 3
    ledger.flush()
    rows = ledger.backend.query("SELECT request_id, candidate_route FROM router_shadow", [])
    ledger.close()
    assert dict(rows) == {"in-window": "strong", "off-peak": "weak", "in-again": "strong"}
