"""Feedback learning per team: a team's `/v1/feedback` ratings steer its own requests, not
another team's; the operator's (a key of no team) steer everyone's; with `tenants: pooled`
every rating steers everyone, as documented.

Before, the learner had one set of shifts for every request: under `balanced` (the default)
a team that was the only one to rate moved nothing, its own routing included; under `pooled`
it moved every team's. Now the core keeps a table of shifts per team beside the global one.

The proxy is the real app on edgeroute's HTTP server, the clients the official SDK and plain
HTTP; `auto` chooses the weak route for TEXT by 0.05, so a dozen ratings of 0 on the weak route
(a shift of -0.15) send TEXT to the strong one for whoever those ratings steer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from edgeroute.learning import FeedbackLearner
from edgeroute.learning_share import LearningShare, SqliteLearnStore
from tests.conftest import Upstream
from tests.test_selection import WEAK_OUT, config, msg

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"
KEYS = {
    "root": {"token": "root-tok", "role": "admin"},
    "ops": {"token": "ops-svc", "role": "operator"},  # the operator's: no team, role operator
    "a_svc": {"token": "a-svc", "team": "teamA", "role": "service"},
    "b_svc": {"token": "b-svc", "team": "teamB", "role": "service"},
    "a_view": {"token": "a-view", "team": "teamA", "role": "viewer"},
    "b_view": {"token": "b-view", "team": "teamB", "role": "viewer"},
}
RATINGS = 12


async def _post(url: str, path: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers={"authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()


async def _learning(url: str, token: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/learning", headers={"authorization": f"Bearer {token}"}) as r:
            return r.status, await r.json()


async def _routes(url: str, token: str, n: int = 10) -> set[str]:
    """Where TEXT goes for `token`'s key, over `n` decisions (explained) and one served request."""
    seen = set()
    for _ in range(n):
        status, out = await _post(url, "/v1/route/explain", token, {"model": "auto", "messages": msg(TEXT)})
        assert status == 200, out
        seen.add(str(out["route"]))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": TEXT}]
    )
    await client.close()
    seen.add(raw.headers["x-edgeroute-route"])
    return seen


async def _rate_weak_badly(url: str, token: str) -> None:
    """`token`'s key asks the weak route RATINGS times (maths prompts, through `weak-ab`, an
    experiment that chooses it: routing chose the route, so the score teaches) and rates each
    answer 0."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    for i in range(RATINGS):
        text = TEXT.replace("3 apples", f"{i + 10} apples")
        raw = await client.chat.completions.with_raw_response.create(
            model="weak-ab", messages=[{"role": "user", "content": text}]
        )
        status, body = await _post(url, "/v1/feedback", token, {"request_id": raw.headers["x-request-id"], "score": 0})
        assert status == 200 and body["accepted"] is True and "learned" not in body, body
    await client.close()


async def _proxy(
    strong: Upstream, weak: Upstream, start_proxy: Any, keys: dict[str, Any] = KEYS, **feedback: Any
) -> Any:
    probe = await start_proxy(config(strong, weak))
    status, out = await _post(probe.url, "/v1/route/explain", "x", {"model": "auto", "messages": msg(TEXT)})
    assert status == 200, out
    threshold = out["scores"][WEAK_OUT] - 0.05
    learning = {"feedback": {"max_shift": 0.15, **feedback}}
    return await start_proxy(with_weak_ab(config(strong, weak, threshold=threshold, keys=keys, learning=learning)))


def with_weak_ab(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with `weak-ab`, an experiment sending every request to the weak route."""
    cfg["models"]["weak-ab"] = {"experiment": {"variants": [{"route": "weak", "percent": 100}]}}
    return cfg


async def test_a_teams_ratings_steer_its_own_requests_and_the_operators_everyones(
    start_upstream: Any, start_proxy: Any
) -> None:
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy)
    for token in ("a-svc", "b-svc", "ops-svc"):
        assert await _routes(proxy.url, token) == {"weak"}

    await _rate_weak_badly(proxy.url, "a-svc")  # team A alone rates the weak route 0
    assert await _routes(proxy.url, "a-svc") == {"strong"}  # A's requests move off it
    assert await _routes(proxy.url, "b-svc") == {"weak"}  # B's do not
    assert await _routes(proxy.url, "ops-svc") == {"weak"}  # nor the operator's

    # Who sees what: the operator every team's; a team's key its own team's alone.
    status, state = await _learning(proxy.url, "root-tok")
    assert status == 200 and state["tenants"] == "per_team", state
    assert [(t["team"], t["route"], t["beta"]) for t in state["teams"]] == [("teamA", "weak", 1.0 + RATINGS)]
    assert [(p["alpha"], p["beta"]) for p in state["routing"]] == [(1.0, 1.0)]  # everyone's: the prior
    status, mine = await _learning(proxy.url, "a-view")
    assert status == 200 and [t["team"] for t in mine["teams"]] == ["teamA"], mine
    status, theirs = await _learning(proxy.url, "b-view")
    assert status == 200, theirs
    assert theirs["teams"] == [] and theirs["evidence"] == [] and theirs["posteriors"] == [], theirs

    await _rate_weak_badly(proxy.url, "ops-svc")  # the operator's ratings steer everyone's requests
    assert await _routes(proxy.url, "b-svc") == {"strong"}
    assert await _routes(proxy.url, "ops-svc") == {"strong"}
    assert await _routes(proxy.url, "a-svc") == {"strong"}
    status, theirs = await _learning(proxy.url, "b-view")
    assert [(e["tenant"], e["b"]) for e in theirs["evidence"]] == [("anonymous", float(RATINGS))], theirs


async def test_with_pooled_tenants_a_teams_ratings_steer_everyone(start_upstream: Any, start_proxy: Any) -> None:
    proxy = await _proxy(await start_upstream(), await start_upstream(), start_proxy, tenants="pooled")
    assert await _routes(proxy.url, "b-svc") == {"weak"}
    await _rate_weak_badly(proxy.url, "a-svc")
    assert await _routes(proxy.url, "b-svc") == {"strong"}  # as documented: every score steers everyone
    assert await _routes(proxy.url, "a-svc") == {"strong"}
    status, state = await _learning(proxy.url, "root-tok")
    assert status == 200 and state["tenants"] == "pooled" and state["teams"] == [], state


async def test_a_second_instance_applies_a_teams_shifts(tmp_path: Path) -> None:
    """Two learners sharing a store (the workers' file; Redis carries the same sums): team A's
    ratings made on one give the other A's shifts, for A alone."""
    one, two = FeedbackLearner(None, seed=1), FeedbackLearner(None, seed=2)
    shares = [LearningShare(SqliteLearnStore(tmp_path / "learning.db"), learner) for learner in (one, two)]
    one.share, two.share = shares
    await shares[0].seed()
    for n in range(RATINGS):
        one.served(f"r{n}", "weak", "math", 0.0, key="a_svc", team="teamA")
        one.feedback(f"r{n}", 0.0)
    await shares[0].flush()
    await shares[1].sync()
    assert two.shifts() == {}  # nobody else's routing moves
    assert two.team_shifts()["teamA"][("math", "weak")] < -0.1
    assert set(two.team_shifts()) == {"teamA"}
    for share in shares:
        await share.store.close()
