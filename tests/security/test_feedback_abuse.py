"""`POST /v1/feedback` under attack: one tenant's scores must not reach another tenant's
requests, and one key must not move the learner that routes everyone's requests by
repeating itself."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai

from tests.conftest import Proxy, ProxyTestServer

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"
TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789", "root": "tok-root-0123456789"}


def _config(up: Any) -> dict[str, Any]:
    """A policy route (its requests have a task, so feedback reaches the learner), keys, and
    feedback learning without a request log: the learner is the only judge of a request id."""
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    return {
        "providers": {"p": {"base_url": up.base_url}},
        "deployments": {
            "big": {"provider": "p", "model": "gpt-4o", "price": price},
            "small": {"provider": "p", "model": "gpt-4o-mini", "price": price},
        },
        "models": {
            "strong": {"deployments": ["big"]},
            "weak": {"deployments": ["small"]},
            "auto": {
                "policy": {
                    "threshold": 0.7,
                    "candidates": [
                        {"route": "strong", "model": "gpt-4-1106-preview"},
                        {"route": "weak", "model": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
                    ],
                }
            },
        },
        "keys": {
            "alice": {"token": TOKENS["alice"], "team": "a"},
            "bob": {"token": TOKENS["bob"], "team": "b"},
            "root": {"token": TOKENS["root"], "role": "admin"},
        },
        "learning": {"feedback": {"max_shift": 0.15}},
    }


async def _ask(proxy: Proxy, who: str) -> str:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=TOKENS[who], max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": TEXT}]
    )
    await client.close()
    return raw.headers["x-request-id"]


async def _rate(s: aiohttp.ClientSession, proxy: Proxy, who: str, body: object) -> int:
    headers = {"Authorization": f"Bearer {TOKENS[who]}"}
    async with s.post(proxy.url + "/v1/feedback", json=body, headers=headers) as r:
        return r.status


async def _posteriors(s: aiohttp.ClientSession, proxy: Proxy) -> list[dict[str, Any]]:
    async with s.get(proxy.url + "/admin/learning", headers={"Authorization": f"Bearer {TOKENS['root']}"}) as r:
        assert r.status == 200
        rows: list[dict[str, Any]] = (await r.json())["posteriors"]
        return rows


def _between(before: str, after: str) -> list[str]:
    """Ids an attacker derives from two of its own: their neighbours, if ids count up."""
    head, a, b = before[:-8], int(before[-8:], 16), int(after[-8:], 16)
    return [f"{head}{n:08x}" for n in range(max(0, min(a, b) - 3), max(a, b) + 4)] if head == after[:-8] else []


async def test_a_tenant_cannot_rate_another_tenants_request_by_guessing_its_id(start_upstream, start_proxy) -> None:
    proxy = await start_proxy(_config(await start_upstream()))
    mine = await _ask(proxy, "bob")
    victim = await _ask(proxy, "alice")
    mine_again = await _ask(proxy, "bob")
    guesses = [g for g in _between(mine, mine_again) if g not in (mine, mine_again)]
    assert victim not in guesses
    async with aiohttp.ClientSession() as s:
        accepted = [g for g in guesses if await _rate(s, proxy, "bob", {"request_id": g, "score": 0}) == 200]
        assert accepted == []
        assert await _rate(s, proxy, "bob", {"request_id": mine, "score": 1}) == 200  # its own, as before
        assert [p["alpha"] + p["beta"] for p in await _posteriors(s, proxy)] == [3.0]  # one score over the prior


async def test_a_repeated_score_moves_the_learner_once(start_upstream, start_proxy) -> None:
    proxy = await start_proxy(_config(await start_upstream()))
    rid = await _ask(proxy, "alice")
    async with aiohttp.ClientSession() as s:
        for _ in range(50):
            assert await _rate(s, proxy, "alice", {"request_id": rid, "score": 1.0}) == 200
        # One request, one vote: 50 replays must not drive the route's posterior to ~1.
        assert [p["alpha"] + p["beta"] for p in await _posteriors(s, proxy)] == [3.0]


async def test_a_score_that_is_not_a_number_is_a_400(start_upstream, start_proxy) -> None:
    proxy = await start_proxy(_config(await start_upstream()))
    rid = await _ask(proxy, "alice")
    async with aiohttp.ClientSession() as s:
        statuses = [await _rate(s, proxy, "alice", {"request_id": rid, "score": v}) for v in ("1", True, "nan", None)]
        assert statuses == [400, 400, 400, 400]
        assert await _posteriors(s, proxy) == []


async def test_a_feedback_flood_meets_the_callers_limit(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(await start_upstream())
    cfg["learning"]["feedback_rpm"] = 3
    proxy = await start_proxy(cfg)
    rid = await _ask(proxy, "alice")
    async with aiohttp.ClientSession() as s:
        statuses = [await _rate(s, proxy, "alice", {"request_id": f"guess-{i}", "score": 0}) for i in range(3)]
        assert statuses == [404, 404, 404]  # unknown ids, each looked up
        headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
        async with s.post(proxy.url + "/v1/feedback", json={"request_id": rid, "score": 1}, headers=headers) as r:
            body = await r.json()
            assert r.status == 429 and body["error"]["code"] == "rate_limit_exceeded"
            assert 1 <= int(r.headers["Retry-After"]) <= 20  # a call back every 20 s at 3 a minute
        assert await _rate(s, proxy, "alice", "not even JSON") == 429  # limited before the body is read
        assert await _rate(s, proxy, "bob", {"request_id": "guess-x", "score": 0}) == 404  # another key's own limit


async def test_feedback_lookups_waiting_at_once_are_bounded(start_upstream, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Unknown ids wait for the request log to be sure; a burst of them must not pile up
    database readers: past the bound, 503 at once."""
    from edgeroute import config as config_mod
    from edgeroute import learning
    from edgeroute.server import create_app

    monkeypatch.setattr(learning, "MAX_LOOKUPS", 2)
    cfg = _config(await start_upstream())
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "spend.db")}  # the request log: the judge
    server = ProxyTestServer(create_app(config_mod.parse(cfg, "t.yaml"), "t.yaml"), host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        headers = {"Authorization": f"Bearer {TOKENS['alice']}"}

        async def rate(s: aiohttp.ClientSession, i: int) -> int:
            async with s.post(
                url + "/v1/feedback", json={"request_id": f"guess-{i}", "score": 0}, headers=headers
            ) as r:
                return r.status

        async with aiohttp.ClientSession() as s:
            statuses = await asyncio.gather(*(rate(s, i) for i in range(6)))
    finally:
        await server.close()
    assert sorted(statuses) == [404, 404, 503, 503, 503, 503]
