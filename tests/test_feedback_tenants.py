"""Feedback (`POST /v1/feedback`) from one tenant must not steer another tenant's routing.

The learner's shifts go to the core for every tenant's requests. Before, team A rated a
dozen answers 0 (most of them free cache hits of one prompt) and team B's prompts of that
task moved to the 300x dearer route. Now a cache hit is not a routing outcome (its score is
answered `learned: false`), and a tenant's ratings weigh at most all other tenants' together,
so A alone moves nothing, while a keyless gateway (one tenant) learns as before.
With the request log off, the learner's own record of each request says whose it is: another
key's request id is answered 404, as with the log on.

The proxy is the real app on edgeroute's HTTP server, the clients are the official SDK and
plain HTTP."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import redis.asyncio as aioredis

from edgeroute import config as config_mod
from edgeroute.accounting import RequestRecord
from edgeroute.config import SharedState
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend
from edgeroute.learn import from_log
from edgeroute.learning import ANONYMOUS, FeedbackLearner, Posterior, pool, tenant_id
from edgeroute.learning_share import LearningShare, RedisLearnStore, SqliteLearnStore
from edgeroute.requestlog import outcomes
from edgeroute.requestlog.settings import RequestLog
from tests.conftest import Upstream
from tests.test_cost_support import require_redis
from tests.test_feedback_per_team import with_weak_ab
from tests.test_selection import WEAK_OUT, config, msg

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"
KEYS = {
    "root": {"token": "root-tok", "role": "admin"},
    "a_svc": {"token": "a-svc", "team": "teamA", "role": "service"},
    "b_svc": {"token": "b-svc", "team": "teamB", "role": "service"},
}


async def _post(url: str, path: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers={"authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()


async def _route_for(url: str, token: str) -> str:
    status, out = await _post(url, "/v1/route/explain", token, {"model": "auto", "messages": msg(TEXT)})
    assert status == 200, out
    return str(out["route"])


async def _policy_config(strong: Upstream, weak: Upstream, start_proxy: Any, **extra: Any) -> dict[str, Any]:
    """`auto` choosing the weak route for TEXT, by 0.05: a few ratings of 0 on it (a shift of
    up to -0.15) would send TEXT to the strong route."""
    probe = await start_proxy(config(strong, weak))
    status, out = await _post(probe.url, "/v1/route/explain", "x", {"model": "auto", "messages": msg(TEXT)})
    assert status == 200, out
    cfg = with_weak_ab(config(strong, weak, threshold=out["scores"][WEAK_OUT] - 0.05, **extra))
    for route in ("strong", "weak"):
        cfg["models"][route]["cache"] = {"ttl": 600, "scope": "key"}
    return cfg


async def test_one_teams_zero_ratings_leave_another_teams_routing_alone(start_upstream, start_proxy) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    cfg = await _policy_config(strong, weak, start_proxy, keys=KEYS, learning={"feedback": {"max_shift": 0.15}})
    proxy = await start_proxy(cfg)
    assert await _route_for(proxy.url, "b-svc") == "weak"

    a = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="a-svc", max_retries=0)
    hits = paid = 0
    for i in range(24):  # one prompt again and again (cache hits, free), and fresh paid ones
        text = TEXT if i % 2 else TEXT.replace("3 apples", f"{i + 10} apples")
        raw = await a.chat.completions.with_raw_response.create(model="weak-ab", messages=msg(text), temperature=0)
        hit = raw.headers.get("x-edgeroute-cache") == "hit"
        status, body = await _post(
            proxy.url, "/v1/feedback", "a-svc", {"request_id": raw.headers["x-request-id"], "score": 0}
        )
        assert status == 200, body
        if hit:  # not a routing outcome: said so, not learned
            hits += 1
            assert body["learned"] is False and body["accepted"] is False and "cached answer" in body["reason"], body
        else:
            paid += 1
            assert body["accepted"] is True and "learned" not in body, body
    assert hits >= 10 and paid >= 10
    await a.close()

    # B's prompts of that task still go where they went: explained and served.
    assert [await _route_for(proxy.url, "b-svc") for _ in range(20)] == ["weak"] * 20
    b = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="b-svc", max_retries=0)
    raw = await b.chat.completions.with_raw_response.create(model="auto", messages=msg(TEXT))
    assert raw.headers["x-edgeroute-route"] == "weak"
    await b.close()

    # A's ratings are kept, as team A's: they count once another tenant's ratings weigh as much.
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/admin/learning", headers={"authorization": "Bearer root-tok"}) as r:
            state = await r.json()
    (mine,) = [e for e in state["evidence"] if e["route"] == "weak"]
    assert mine["tenant"] == "team:teamA" and mine["a"] == 0 and mine["b"] == paid
    assert [(p["alpha"], p["beta"]) for p in state["routing"]] == [(1.0, 1.0)]  # routing draws from the prior
    assert [(p["alpha"], p["beta"]) for p in state["posteriors"]] == [(1.0, 1.0 + paid)]  # every score received


async def test_without_the_request_log_another_keys_request_is_not_rated(start_upstream, start_proxy) -> None:
    strong, weak = await start_upstream(), await start_upstream()
    cfg = config(strong, weak, keys=KEYS, learning={"feedback": {"max_shift": 0.15}})  # no ledger: no request log
    proxy = await start_proxy(cfg)
    b = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="b-svc", max_retries=0)
    rid = (await b.chat.completions.with_raw_response.create(model="auto", messages=msg(TEXT))).headers["x-request-id"]
    await b.close()

    status, body = await _post(proxy.url, "/v1/feedback", "a-svc", {"request_id": rid, "score": 0})
    assert status == 404 and body["error"]["code"] == "unknown_request_id", body
    # Refused as an unknown id is (its existence not told), and the owner's first rating still counts.
    unknown = await _post(
        proxy.url, "/v1/feedback", "a-svc", {"request_id": "req_0000000000deadbeefdeadbe", "score": 0}
    )
    assert unknown[0] == 404 and unknown[1]["error"]["message"].startswith("No recent routed request")
    status, body = await _post(proxy.url, "/v1/feedback", "b-svc", {"request_id": rid, "score": 1})
    assert status == 200 and body["accepted"] is True, body
    status, body = await _post(proxy.url, "/v1/feedback", "root-tok", {"request_id": rid, "score": 1})
    assert status == 200, body  # a global admin may rate any request
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/admin/learning", headers={"authorization": "Bearer root-tok"}) as r:
            state = await r.json()
    assert [(e["tenant"], e["a"], e["b"]) for e in state["evidence"]] == [("team:teamB", 1.0, 0.0)]


def test_pooling_bounds_each_tenant_by_all_the_others() -> None:
    prior = (1.0, 1.0)
    assert pool({"team:A": (0.0, 30.0)}, prior, balanced=True) == Posterior(1.0, 1.0)  # alone: nothing
    assert pool({ANONYMOUS: (0.0, 30.0)}, prior, balanced=True) == Posterior(1.0, 31.0)  # a keyless gateway
    # B rated 3 answers 1, A 30 answers 0: A weighs as much as B, no more.
    assert pool({"team:A": (0.0, 30.0), "team:B": (3.0, 0.0)}, prior, balanced=True) == Posterior(4.0, 4.0)
    assert pool({"team:A": (0.0, 30.0), "team:B": (3.0, 0.0)}, prior, balanced=False) == Posterior(4.0, 31.0)
    # The operator's tenant (keys of no team, keyless callers) counts in full; a team beside it is bounded.
    assert pool({ANONYMOUS: (3.0, 0.0), "team:A": (0.0, 30.0)}, prior, balanced=True) == Posterior(4.0, 4.0)
    assert tenant_id(None) == ANONYMOUS
    assert tenant_id("A") == "team:A"


def test_a_tenant_alone_gives_no_shift_and_a_keyless_one_learns(tmp_path: Path) -> None:
    learner = FeedbackLearner(None, max_shift=0.15, seed=1)
    for n in range(10):
        learner.served(f"a{n}", "weak", "math", 0.0, key="a_svc", team="teamA")
        learner.feedback(f"a{n}", 0.0)
    learner.served("hit", "weak", "math", 0.0, key="a_svc", team="teamA", cached=True)
    learner.feedback("hit", 0.0)
    assert learner.evidence[("math", "weak")] == {"team:teamA": (0.0, 10.0)}  # the hit not counted
    assert learner.shifts() == {}
    keyless = FeedbackLearner(None, max_shift=0.15, seed=1)
    for n in range(10):
        keyless.served(f"k{n}", "weak", "math", 0.0)
        keyless.feedback(f"k{n}", 0.0)
    assert keyless.shifts()[("math", "weak")] < -0.1


def test_state_file_keeps_tenants_and_reads_one_from_before(tmp_path: Path) -> None:
    path = tmp_path / "learning.json"
    learner = FeedbackLearner(path)
    for rid, team, score in (("a", "teamA", 0.0), ("b", "teamB", 1.0)):
        learner.served(rid, "weak", "math", 0.0, key=f"{team}-key", team=team)
        learner.feedback(rid, score)
    learner.save()
    again = FeedbackLearner(path)
    assert again.evidence == learner.evidence and again.posteriors == learner.posteriors
    # A file from before tenants were kept: its posteriors are the one anonymous tenant's.
    path.write_text(json.dumps({"posteriors": [{"task": "math", "route": "weak", "alpha": 3.0, "beta": 5.0}]}))
    old = FeedbackLearner(path)
    assert old.evidence == {("math", "weak"): {ANONYMOUS: (2.0, 4.0)}}
    assert old.posteriors[("math", "weak")] == Posterior(3.0, 5.0)


async def test_shared_learners_keep_whose_request_and_tenant(tmp_path: Path) -> None:
    """Two processes sharing a store (the workers' file; Redis keeps the same records)."""
    one, two = FeedbackLearner(None), FeedbackLearner(None)
    for learner in (one, two):
        learner.share = LearningShare(SqliteLearnStore(tmp_path / "learning.db"), learner)
    share_one, share_two = one.share, two.share
    assert isinstance(share_one, LearningShare) and isinstance(share_two, LearningShare)
    await share_one.seed()
    one.served("r1", "weak", "math", 0.0, key="a_svc", team="teamA")
    one.served("r2", "weak", "math", 0.0, key="a_svc", team="teamA", cached=True)
    one.feedback("r1", 0.0)
    await share_one.flush()
    found = await share_two.lookup("r1")
    assert found is not None and (found.key, found.team, found.cached) == ("a_svc", "teamA", False)
    hit = await share_two.lookup("r2")
    assert hit is not None and hit.cached
    await share_two.sync()
    assert two.evidence == {("math", "weak"): {"team:teamA": (0.0, 1.0)}}
    assert two.shifts() == {}


def test_train_from_log_names_a_tenant_that_gave_most_ratings(tmp_path: Path) -> None:
    """`router train --from-log` trains one router for every tenant: a tenant behind most of
    its rows is named, so that the operator checks those ratings before using the router."""
    db = SqliteBackend(tmp_path / "log.db")
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog(retention_days=1))
    now = time.time()
    for n, team in enumerate(["teamA"] * 5 + ["teamB"]):
        body = json.dumps({"model": "weak", "messages": msg(f"what is {n} + {n}?")})
        ledger.record(
            RequestRecord(request_id=f"r{n}", started=now, model="auto", route="weak", status=200, outcome="ok",
                          key=f"{team}-key", team=team, policy="auto", content_mode="full",
                          content_request=body.encode())
        )  # fmt: skip
        ledger.outcome(outcomes.FEEDBACK, (f"r{n}", now, 0.0, f"{team}-key"))
    ledger.flush()
    cfg = config_mod.parse(config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"), "test.yaml")
    found = from_log.read(db, cfg)
    assert found.tenants == {"team:teamA": 5, "team:teamB": 1}
    assert found.explain().endswith("5 of the usable from team:teamA alone: check its ratings before using the router")


def test_train_from_log_counts_keys_of_no_team_apart_and_skips_tenants_named_routes(tmp_path: Path) -> None:
    """`router train --from-log` read every key of no team as the operator (trusted, never named
    as the tenant behind most rows), and trained on routes a tenant's client named itself: a
    client asking `weak` for what it then rates chose which route its ratings teach about. Keys
    of no team are counted as the online learner counts them (a `service` key: its own tenant);
    a route named by a tenant's client is skipped and counted, by the operator's caller kept."""
    db = SqliteBackend(tmp_path / "log.db")
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog(retention_days=1))
    now = time.time()
    callers = [("svc", None, "auto")] * 4 + [("boss", None, None), (None, None, None), ("ta", "teamA", None)]
    for n, (key, team, policy) in enumerate(callers):
        body = json.dumps({"model": "weak", "messages": msg(f"what is {n} + {n}?")})
        ledger.record(
            RequestRecord(request_id=f"r{n}", started=now, model=policy or "weak", route="weak", status=200,
                          outcome="ok", key=key, team=team, policy=policy, content_mode="full",
                          content_request=body.encode())
        )  # fmt: skip
        ledger.outcome(outcomes.FEEDBACK, (f"r{n}", now, 0.0, key))
    ledger.flush()
    raw = config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    raw["keys"] = {"svc": {"token": "sk-svc-0123456789"}, "boss": {"token": "sk-boss-0123456789", "role": "admin"},
                   "ta": {"token": "sk-ta-0123456789", "team": "teamA"}}  # fmt: skip
    found = from_log.read(db, config_mod.parse(raw, "test.yaml"))
    assert found.tenants == {"key:svc": 4, "anonymous": 2} and found.named == 1, found.tenants
    assert found.explain() == (
        "7 rated request(s) in the request log, 6 usable; 1 on a route a tenant's client named itself "
        "(not chosen by routing); 4 of the usable from key:svc alone: check its ratings before using the router"
    )


async def test_redis_keeps_the_anonymous_sums_where_releases_before_read_them() -> None:
    """Through Redis: the anonymous tenant's sums keep their hash and field names (a release
    from before tenants were kept reads them, and would fail on a field naming a tenant);
    other tenants' go to a hash of their own, and both are read back per tenant."""
    url = require_redis()
    prefix = f"t-tenants-{uuid.uuid4().hex[:8]}"
    cfg = SharedState(redis_url=url, prefix=prefix, timeout_ms=2000)
    one, two = FeedbackLearner(None), FeedbackLearner(None)
    shares = [LearningShare(RedisLearnStore(cfg), learner) for learner in (one, two)]
    one.share, two.share = shares
    redis = aioredis.Redis.from_url(url)
    try:
        await shares[0].seed()
        one.served("anon", "weak", "math", 0.0)
        one.served("team", "weak", "math", 0.0, key="a_svc", team="teamA")
        one.feedback("anon", 1.0)
        one.feedback("team", 0.0)
        await shares[0].flush()
        assert await redis.hgetall(f"{prefix}:learn:posteriors") == {
            b"math\x1fweak\x1fa": b"1",
            b"math\x1fweak\x1fb": b"0",
        }
        assert set(await redis.hkeys(f"{prefix}:learn:tenant-sums")) == {
            b"math\x1fweak\x1fteam:teamA\x1fa",
            b"math\x1fweak\x1fteam:teamA\x1fb",
        }
        assert json.loads(await redis.get(f"{prefix}:learn:req:anon")) == ["weak", "math", 0.0]  # as before
        await shares[1].sync()
        assert two.evidence == {("math", "weak"): {ANONYMOUS: (1.0, 0.0), "team:teamA": (0.0, 1.0)}}
        found = await shares[1].lookup("team")
        assert found is not None and (found.key, found.team) == ("a_svc", "teamA")
    finally:
        await redis.delete(*[k async for k in redis.scan_iter(f"{prefix}:*")])
        await redis.aclose()
        for share in shares:
            await share.store.close()
