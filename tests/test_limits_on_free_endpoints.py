"""`/v1/route/explain` and `/v1/messages/count_tokens` call no upstream but decide or count a
body of up to `max_body_bytes`: each counts against its key's RPM (and that of the keys that
made it) with a chat request's 429, `Retry-After` and `x-ratelimit-*` headers, in process, through
Redis and across the workers of one `serve --workers N`; it takes no tokens and spends nothing;
a revoked or expired key is refused there as anywhere. A 429 there is in `/metrics` as a chat
request's is, its `route` label the endpoint's path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, eventually
from tests.dispatch_support import HELLO, StartProxy, ok
from tests.dispatch_support import upstreams as upstreams  # a fixture
from tests.governance_support import call
from tests.metrics_support import scrape
from tests.scale.support import Spawn
from tests.scale.support import spawn as spawn  # a fixture
from tests.test_cost_support import cost_proxy, require_redis

LIMITED, ADMIN = "tok-limited-4e1b", "tok-admin-c07d"
EXPLAIN = {"model": "m", "messages": HELLO}


def _keys(cfg: dict[str, Any], rpm: int, tpm: int | None = None) -> dict[str, Any]:
    limits = {"rpm": rpm} | ({"tpm": tpm} if tpm is not None else {})
    cfg["keys"] = {"limited": {"token": LIMITED, "limits": limits}, "root": {"token": ADMIN, "role": "admin"}}
    return cfg


async def _explain(url: str, token: str = LIMITED, body: Any = EXPLAIN) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/route/explain", json=body, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, dict(r.headers), await r.json()


def _lower(h: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in h.items()}


def _anthropic(url: str, token: str = LIMITED) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=token, max_retries=0)


async def _count(url: str, token: str = LIMITED) -> Any:
    async with _anthropic(url, token) as client:
        return await client.messages.with_raw_response.count_tokens(model="m", messages=HELLO)


async def test_explain_and_count_tokens_take_from_the_keys_rpm(upstreams: Any, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_keys(await upstreams(ok), rpm=3))
    status, h, body = await _explain(proxy.url)
    assert status == 200 and body["deployment"] == "d-a"
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
    raw = await _count(proxy.url)
    assert (await raw.parse()).input_tokens > 0 and raw.headers["x-ratelimit-remaining-requests"] == "1"
    # The same bucket as chat's: a chat request takes the last one, then both are refused.
    chat = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=LIMITED, max_retries=0)
    assert (await chat.chat.completions.create(model="m", messages=HELLO)).choices
    await chat.close()
    status, h, body = await _explain(proxy.url)
    assert status == 429, body
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert "requests per minute on key 'limited'" in body["error"]["message"]
    assert int(h["Retry-After"]) >= 1 and h["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(anthropic.RateLimitError) as ei:
        await _count(proxy.url)
    e = ei.value
    assert e.body["type"] == "error" and e.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "key 'limited'" in e.message and LIMITED not in e.message
    assert int(e.response.headers["retry-after"]) >= 1
    assert e.response.headers["x-ratelimit-limit-requests"] == "3"
    # Another key has its own bucket.
    assert (await _explain(proxy.url, ADMIN))[0] == 200


async def test_their_429s_are_in_the_metrics_as_chats_are(upstreams: Any, start_proxy: StartProxy) -> None:
    cfg = _keys(await upstreams(ok), rpm=1)
    rule = {"name": "limited", "kind": "rate_limited_rate", "threshold": 0.5, "min_requests": 3}
    cfg["alerts"] = {"interval_s": 1, "rules": [rule]}
    proxy = await start_proxy(cfg)
    assert (await _explain(proxy.url))[0] == 200
    assert (await _explain(proxy.url))[0] == 429
    with pytest.raises(anthropic.RateLimitError):
        await _count(proxy.url)
    with pytest.raises(anthropic.RateLimitError):
        await _count(proxy.url)
    chat = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await chat.chat.completions.create(model="m", messages=HELLO)
    await chat.close()
    await asyncio.sleep(0.05)  # observed on the next loop turn
    m = await scrape(proxy.url, ADMIN)
    refused = {"status": "429", "outcome": "rate_limited"}
    assert m.value("edgeroute_requests_total", route="m", **refused) == 1  # the chat request's
    assert m.value("edgeroute_requests_total", route="/v1/route/explain", **refused) == 1
    assert m.value("edgeroute_requests_total", route="/v1/messages/count_tokens", **refused) == 2
    errors = "edgeroute_request_errors_total"
    assert m.value(errors, route="m", error_class="rate_limit_exceeded") == 1
    assert m.value(errors, route="/v1/route/explain", error_class="rate_limit_exceeded") == 1
    assert m.value(errors, route="/v1/messages/count_tokens", error_class="rate_limit_exceeded") == 2
    # The answered one is counted too: its 429s are a share of all its requests, not of the
    # refused ones alone (the rate leaned up to 100 % on a key answered almost always).
    assert m.value("edgeroute_requests_total", route="/v1/route/explain", status="200", outcome="ok") == 1
    assert m.total("edgeroute_requests_total", route="/v1/route/explain") == 2
    # Each refusal is recorded (the request log's, at no cost); the answered one spends nothing.
    assert sorted(r.route for r in proxy.recorder.records) == [
        "/v1/messages/count_tokens", "/v1/messages/count_tokens", "/v1/route/explain", "m"
    ]  # fmt: skip
    assert all(r.cost_usd == 0 and r.content_request is None for r in proxy.recorder.records)

    async def firing() -> Any:  # four 429s in the window beside the chat request's, of six requests
        status, body = await call("GET", proxy.url + "/admin/alerts", ADMIN)
        assert status == 200, body
        return [a for a in body["firing"] if a["rule"] == "limited"]

    (alert,) = await eventually(firing, "the rate_limited_rate alert", within=10)
    # Its value when it fired: 5/6 once all are in (2/3 to 4/5 while they came); 1.0 counted 429s alone.
    assert 0.5 <= alert["value"] < 1.0, alert


async def test_their_429s_are_in_the_request_log(upstreams: Any, tmp_path: Path) -> None:
    """`/admin/requests` and `/admin/stats` showed a key's refused chats and none of its refused
    explains or counts: an operator looking for why a key was limited saw nothing."""
    cfg = _keys(await upstreams(ok), rpm=1)
    cfg["ledger"] = {"path": str(tmp_path / "l.db"), "flush_interval": 0.05}
    async with cost_proxy(cfg) as proxy:
        assert (await _explain(proxy.url))[0] == 200
        status, h, _ = await _explain(proxy.url)
        assert status == 429
        with pytest.raises(anthropic.RateLimitError) as ei:
            await _count(proxy.url)
        ids = {
            _lower(h)["x-request-id"]: "/v1/route/explain",
            ei.value.response.headers["x-request-id"]: "/v1/messages/count_tokens",
        }

        async def listed() -> Any:
            status, body = await call("GET", proxy.url + "/admin/requests?status=429&limit=10", ADMIN)
            assert status == 200, body
            return body["data"] if len(body["data"]) == 2 else None

        rows = await eventually(listed, "the 429s in the request log", within=10)
        assert {r["id"]: r["route"] for r in rows} == ids
        assert all(r["key"] == "limited" and r["outcome"] == "rate_limited" and r["cost_usd"] == 0 for r in rows)
        for rid in ids:
            status, one = await call("GET", proxy.url + f"/admin/requests/{rid}", ADMIN)
            assert status == 200 and one.get("content") is None, one
            assert LIMITED not in str(one)
        _, stats = await call("GET", proxy.url + "/admin/stats?since=1h&group_by=model", ADMIN)
        groups = {g["group"]: g for g in stats["rows"]}
        assert groups["/v1/route/explain"]["requests"] == 1 and groups["/v1/route/explain"]["errors"] == 1, stats


async def test_they_take_no_tokens_and_spend_nothing(upstreams: Any, start_proxy: StartProxy) -> None:
    """A TPM of 50 and bodies of hundreds of tokens: counted as requests alone (no upstream is
    sent a token), so neither is "too large", nothing is recorded and the key's chat keeps its TPM."""
    proxy = await start_proxy(_keys(await upstreams(ok), rpm=100, tpm=50))
    long = {"model": "m", "messages": [{"role": "user", "content": "word " * 400}]}
    for _ in range(3):
        status, h, body = await _explain(proxy.url, body=long)
        assert status == 200 and body["prompt_tokens"] > 50, body
        assert "x-ratelimit-remaining-tokens" not in h
    async with _anthropic(proxy.url) as client:
        counted = await client.messages.count_tokens(model="m", messages=long["messages"])
    assert counted.input_tokens > 50
    assert not proxy.recorder.records
    chat = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=LIMITED, max_retries=0)
    raw = await chat.chat.completions.with_raw_response.create(model="m", messages=HELLO, max_tokens=10)
    await chat.close()
    assert raw.headers["x-ratelimit-remaining-requests"] == "95"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 25  # only its own estimate taken


@contextlib.asynccontextmanager
async def _managed(cfg: dict[str, Any]) -> AsyncIterator[str]:
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    server = ProxyTestServer(create_app(config_mod.parse(cfg, "test.yaml"), "test.yaml"))
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_a_key_made_by_a_limited_key_shares_its_rpm_and_revoked_keys_are_refused(
    upstreams: Any,
) -> None:
    cfg = _keys(await upstreams(ok), rpm=100)
    async with _managed(cfg) as url:
        status, maker = await call("POST", url + "/admin/keys", ADMIN, json={"role": "admin", "rpm": 2})
        assert status == 201, maker
        status, made = await call("POST", url + "/admin/keys", maker["secret"], json={"rpm": 2})
        assert status == 201, made
        assert (await _explain(url, maker["secret"]))[0] == 200
        assert (await (await _count(url, made["secret"])).parse()).input_tokens > 0
        status, _, body = await _explain(url, made["secret"])
        assert status == 429 and f"key '{maker['id']}'" in body["error"]["message"], body
        # Revoked, and expired: a 401 on both, as on chat.
        status, soon = await call("POST", url + "/admin/keys", ADMIN, json={"expires_at": time.time() + 0.5})
        assert status == 201 and (await _explain(url, soon["secret"]))[0] == 200
        assert (await call("DELETE", url + f"/admin/keys/{made['id']}", ADMIN))[0] == 200
        await asyncio.sleep(0.6)
        for token, code in [(made["secret"], "key_revoked"), (soon["secret"], "key_expired")]:
            status, _, body = await _explain(url, token)
            assert status == 401 and body["error"]["code"] == code, body
            with pytest.raises(anthropic.AuthenticationError):
                await _count(url, token)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    import redis.asyncio as aioredis

    prefix = f"edgeroute-free-{os.getpid()}-{os.urandom(4).hex()}"
    client = aioredis.Redis.from_url(require_redis())
    yield prefix
    async for key in client.scan_iter(match=prefix + ":*"):
        await client.delete(key)
    await client.aclose()


async def test_two_instances_on_one_redis_share_the_rpm(
    upstreams: Any, start_proxy: StartProxy, redis_prefix: str
) -> None:
    cfg = _keys(await upstreams(ok), rpm=3)
    cfg["shared_state"] = {"redis_url": require_redis(), "prefix": redis_prefix}
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    assert (await _explain(p1.url))[0] == 200
    assert (await _count(p2.url)).headers["x-ratelimit-remaining-requests"] == "1"
    assert (await _explain(p1.url))[0] == 200
    for url in (p1.url, p2.url):
        status, h, _ = await _explain(url)
        assert status == 429 and int(h["Retry-After"]) >= 1


async def test_the_workers_of_one_serve_share_the_rpm(upstreams: Any, spawn: Spawn) -> None:
    inst = await spawn(_keys(await upstreams(ok), rpm=3), "--workers", "2")
    # Each call on its own connection: the kernel spreads them over both workers.
    seen = [(await _explain(inst.url))[0] for _ in range(8)]
    assert seen.count(200) == 3 and seen.count(429) == 5, seen
