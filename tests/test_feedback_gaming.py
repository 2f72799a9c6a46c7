"""A client must not choose what the router learns or which experiment arm serves it.

Found by a red team (session 34), each reproduced against a running proxy before the fix:
- with `experiment: {sticky: user}` the arm came from the body's `user`, so a keyed client
  tried `user` values on the free `/v1/route/explain` until one landed on the arm it wanted;
  a keyed request is now bucketed by its key's identity (its user, else its id, salted);
- a key of no team counted as the operator whatever its role, so a plain `service` key's
  ratings steered every team's `auto`; and a route the client named itself (`model: weak`)
  was learned from. Now only the operator's keys (role `operator`+) speak for the operator,
  and only routes a policy or experiment chose teach (`learned: false` otherwise);
- a client could rate a shadow mirror's id (`<id>-shadow`), an answer it never saw;
- a repeated score answered `accepted: true` as if it had counted.

The proxy is the real app on edgeroute's HTTP server, the clients the official SDK and plain
HTTP, the upstreams the bundled mock."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai

from edgeroute import config as config_mod
from edgeroute.accounting import RequestRecord
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend
from edgeroute.learn import from_log
from edgeroute.requestlog import outcomes
from edgeroute.requestlog.settings import RequestLog
from edgeroute.shadow_log import ShadowLog
from tests.conftest import eventually
from tests.test_cost_support import cost_proxy
from tests.test_feedback_per_team import KEYS, _learning, _post, _proxy, _rate_weak_badly, _routes
from tests.test_selection import config, msg

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"


def _ab(strong: Any, weak: Any, **extra: Any) -> dict[str, Any]:
    cfg = config(strong, weak, **extra)
    variants = [{"route": "weak", "percent": 50}, {"route": "strong", "percent": 50}]
    cfg["models"]["chat"] = {"experiment": {"sticky": "user", "variants": variants}}
    return cfg


async def _arms(url: str, token: str, users: range) -> set[str]:
    """The routes `/v1/route/explain` gives `chat` for each body `user` in `users`."""
    seen = set()
    for n in users:
        body = {"model": "chat", "messages": msg(TEXT), "user": f"u{n}"}
        status, out = await _post(url, "/v1/route/explain", token, body)
        assert status == 200, out
        seen.add(str(out["route"]))
    return seen


async def test_a_keyed_client_cannot_pick_its_experiment_arm_by_the_body_user(start_upstream, start_proxy) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    keys = {
        "plain": {"token": "plain-tok", "role": "service"},  # no user of its own
        "alice": {"token": "alice-tok", "role": "service", "user": "alice"},
    }
    proxy = await start_proxy(_ab(strong, weak, keys=keys))
    for token in ("plain-tok", "alice-tok"):
        arms = await _arms(proxy.url, token, range(40))
        assert len(arms) == 1, (token, arms)  # forty `user` values, one arm: the key's
        # and the request served goes to that arm too
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0)
        for n in range(3):
            raw = await client.chat.completions.with_raw_response.create(model="chat", messages=msg(TEXT), user=f"x{n}")
            assert raw.headers["x-edgeroute-route"] in arms
        await client.close()

    # The arms of keys are salted per deployment: another salt gives other keys' arms.
    many = {f"k{n}": {"token": f"tok-{n}", "role": "service"} for n in range(24)}
    got = []
    for salt in ("salt-one", "salt-two"):
        p = await start_proxy(_ab(strong, weak, keys=many, learning={"experiment_salt": salt}))
        got.append([next(iter(await _arms(p.url, f"tok-{n}", range(1)))) for n in range(24)])
    assert got[0] != got[1], got

    # Keyless (a sidecar's app): the body's `user` still keeps its requests sticky.
    keyless = await start_proxy(_ab(strong, weak))
    assert await _arms(keyless.url, "x", range(40)) == {"weak", "strong"}


async def test_a_no_team_service_keys_ratings_steer_no_teams_routing(start_upstream, start_proxy) -> None:
    keys = KEYS | {"svc": {"token": "svc-tok", "role": "service"}}  # no team, not the operator
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy, keys=keys)
    assert await _routes(proxy.url, "b-svc") == {"weak"}
    await _rate_weak_badly(proxy.url, "svc-tok")
    assert await _routes(proxy.url, "b-svc") == {"weak"}  # team B's `auto` did not move
    assert await _routes(proxy.url, "ops-svc") == {"weak"}  # nor the operator's
    status, state = await _learning(proxy.url, "root-tok")
    assert status == 200, state
    assert [(e["tenant"], e["b"]) for e in state["evidence"]] == [("key:svc", 12.0)], state
    assert [(p["alpha"], p["beta"]) for p in state["routing"]] == [(1.0, 1.0)]


async def test_a_route_the_client_named_is_not_learned_from(start_upstream, start_proxy) -> None:
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ops-svc", max_retries=0)
    for _ in range(12):
        raw = await client.chat.completions.with_raw_response.create(model="weak", messages=msg(TEXT))
        rid = raw.headers["x-request-id"]
        status, body = await _post(proxy.url, "/v1/feedback", "ops-svc", {"request_id": rid, "score": 0})
        assert status == 200 and body["learned"] is False and body["reason"] == "not_chosen_by_routing", body
    await client.close()
    assert await _routes(proxy.url, "b-svc") == {"weak"}
    status, state = await _learning(proxy.url, "root-tok")
    assert state["evidence"] == [], state


async def test_a_repeated_score_says_it_was_not_learned(start_upstream, start_proxy) -> None:
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="a-svc", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="weak-ab", messages=msg(TEXT))
    await client.close()
    rid = raw.headers["x-request-id"]
    status, first = await _post(proxy.url, "/v1/feedback", "a-svc", {"request_id": rid, "score": 0.5})
    assert status == 200 and "learned" not in first, first
    for score in (0.5, 1):
        status, again = await _post(proxy.url, "/v1/feedback", "a-svc", {"request_id": rid, "score": score})
        assert status == 200 and again["learned"] is False and again["reason"] == "already_scored", again
    _, state = await _learning(proxy.url, "root-tok")
    assert [(e["a"], e["b"]) for e in state["evidence"]] == [(0.5, 0.5)], state


async def test_a_shadow_mirrors_id_cannot_be_rated(start_upstream, tmp_path: Path) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    db = tmp_path / "log.db"
    cfg = config(strong, weak, ledger={"path": str(db), "flush_interval": 0.05}, learning={"feedback": {}})
    cfg["models"]["weak"]["shadow"] = {"model": "strong", "percent": 100}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="weak", messages=msg(TEXT))
        rid = raw.headers["x-request-id"]
        await client.close()

        async def mirrored() -> bool:
            try:
                with sqlite3.connect(db) as c:
                    return c.execute("SELECT 1 FROM requests WHERE id = ?", (rid + "-shadow",)).fetchone() is not None
            except sqlite3.OperationalError:  # the table not made yet
                return False

        await eventually(mirrored, "the mirror's row in the request log")
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid + "-shadow", "score": 0}) as r:
                assert r.status == 404, await r.text()
                assert (await r.json())["error"]["code"] == "unknown_request_id"
            async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid, "score": 1}) as r:
                assert r.status == 200, await r.text()  # the client's own answer is rated as ever


def test_the_shadow_log_is_rotated_past_its_size(tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    slog = ShadowLog(path, max_bytes=4096, files=2)
    pair = {"request_id": "r", "primary": {"answer": "x" * 200}, "shadow": {"answer": "y" * 200}}
    for _ in range(200):  # ~90 KB written
        slog.write(pair)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shadow.jsonl", "shadow.jsonl.1", "shadow.jsonl.2", "shadow.jsonl.lock"], names
    assert all(p.stat().st_size < 4096 + 1024 for p in tmp_path.iterdir())
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in tmp_path.iterdir())


def test_train_from_log_takes_no_mirror_rows(tmp_path: Path) -> None:
    """A score stored on a mirror's row (before the 404) is not an outcome `router train
    --from-log` learns from: the client never saw that answer."""
    db = SqliteBackend(tmp_path / "log.db")
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog(retention_days=1))
    now = time.time()
    for n, mirror in enumerate([False, True, True]):
        body = json.dumps({"model": "weak", "messages": msg(f"what is {n} + {n}?")}).encode()
        outcome = "shadow" if mirror else "ok"
        rec = RequestRecord(request_id=f"r{n}", started=now, model="weak", route="weak", status=200,
                            outcome=outcome, content_mode="full", content_request=body)  # fmt: skip
        rec.shadow_of = "r0" if mirror else None
        ledger.record(rec)
        ledger.outcome(outcomes.FEEDBACK, (f"r{n}", now, 0.0, None))
    ledger.flush()
    cfg = config_mod.parse(config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), "test.yaml")
    assert from_log.read(db, cfg).rated == 1
