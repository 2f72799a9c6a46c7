"""The response cache end to end: the official SDKs through the proxy to mock upstreams."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

import edgeroute
from edgeroute import config as config_mod
from edgeroute.bench.faults import FaultUpstream
from edgeroute.bench.upstream import UpstreamOptions
from edgeroute.cache.service import CACHE
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, eventually, simple_config
from tests.test_cost_support import REDIS_URL, require_redis

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def cached(upstreams: dict[str, Any], **cache: Any) -> dict[str, Any]:
    cfg = simple_config(upstreams)
    cfg["models"]["m"]["cache"] = {"ttl": 60} | cache
    return cfg


def calls(*ups: Any) -> int:
    return sum(len(u.options.requests) for u in ups)


async def stored(proxy: Any) -> None:
    """Until the cache's writes have ended: an answer is stored (and, by meaning, embedded and
    indexed) off the request path, which a loaded host may take longer to do than a fixed sleep."""

    async def idle() -> bool:
        return not proxy.app[CACHE]._writes

    await eventually(idle, "the cache's writes", within=20, every=0.01)


async def test_a_repeated_request_is_a_hit_and_costs_nothing(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    first = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    second = await client.chat.completions.with_raw_response.create(
        model="m", messages=MSG, temperature=0, extra_headers={"x-request-id": "trace-2"}
    )
    assert first.headers["x-edgeroute-cache"] == "miss" and second.headers["x-edgeroute-cache"] == "hit"
    assert second.headers["x-edgeroute-correlation-id"] == "trace-2", "the client's id is echoed on a hit as on a miss"
    assert int(second.headers["age"]) >= 0 and "age" not in first.headers
    assert calls(up) == 1
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert second.headers["x-edgeroute-deployment"] == "d-a"
    assert float(second.headers["x-edgeroute-cost-usd"]) == 0
    await asyncio.sleep(0.05)
    miss, hit = list(proxy.recorder.records)[-2:]
    assert hit.cache == "hit" and hit.cost_usd == 0 and miss.cost_usd > 0
    assert hit.saved_usd == pytest.approx(miss.cost_usd)
    assert miss.cache == "miss" and miss.saved_usd == 0
    await client.close()


async def test_a_hit_does_not_ask_asyncio_for_the_running_loop(start_upstream, start_proxy, monkeypatch) -> None:
    # Each `asyncio.get_running_loop()` is a getpid() system call on Python 3.11: the proxy's
    # own code on a hit's path uses the loop it kept (aiohttp's own call is not ours to keep).
    up = await start_upstream()
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.05)
    package, real, asked = os.path.dirname(edgeroute.__file__), asyncio.get_running_loop, []

    def get_running_loop() -> asyncio.AbstractEventLoop:
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(package):
            asked.append(f"{caller.f_code.co_filename}:{caller.f_lineno}")
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", get_running_loop)
    hit = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.05)  # the hit is observed (metrics, alert window) on the next loop turn
    assert hit.headers["x-edgeroute-cache"] == "hit"
    assert asked == []
    assert list(proxy.recorder.records)[-1].cache == "hit"
    await client.close()


async def test_streams_are_cached_whole_and_replayed_as_streams(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, reply_words=40)
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")

    async def stream_text(usage: bool) -> tuple[str, Any, int, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, stream=True, stream_options={"include_usage": usage}
        )
        text, got_usage, n = "", None, 0
        async for chunk in raw.parse():
            n += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            got_usage = chunk.usage or got_usage
        return text, got_usage, n, raw.headers["x-edgeroute-cache"]

    text1, usage1, _, label1 = await stream_text(True)
    await asyncio.sleep(0.05)
    text2, usage2, n2, label2 = await stream_text(True)
    assert (label1, label2) == ("miss", "hit") and calls(up) == 1
    assert text2 == text1 and len(text1) > 100 and n2 > 3, "replayed in pieces, not one blob"
    assert usage2 is not None and usage1 is not None and usage2.completion_tokens == usage1.completion_tokens
    _, usage3, _, _ = await stream_text(False)
    assert usage3 is None, "usage only when the client asks for it"
    text4, usage4, n4, _ = await stream_text(True)  # the replay rendered before, with usage
    assert (text4, n4) == (text2, n2) and usage4 is not None and usage4.completion_tokens == usage1.completion_tokens
    # The same entry answers a non-streaming request.
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "hit" and raw.parse().choices[0].message.content == text1
    assert calls(up) == 1
    await client.close()


async def test_a_json_answer_serves_a_later_stream(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    first = await client.chat.completions.create(model="m", messages=MSG, seed=7)
    text = ""
    async for chunk in await client.chat.completions.create(model="m", messages=MSG, seed=7, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == first.choices[0].message.content and calls(up) == 1
    await client.close()


# (`no_done`, a finished answer without `[DONE]`, is a whole one: test_stream_ends_without_done.)
@pytest.mark.parametrize("mode", ["reset", "stall", "error_event"])
async def test_a_cut_or_failed_stream_is_never_cached(start_proxy, mode: str) -> None:
    up = FaultUpstream(UpstreamOptions(tokens=8, tokens_per_s=400))
    await up.start()
    try:
        cfg = {
            "providers": {"f": {"base_url": up.url, "timeouts": {"first_byte": 1.0, "idle": 0.3}}},
            "deployments": {"d-f": {"provider": "f", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d-f"], "cache": {"ttl": 60}, "max_attempts": 1}},
        }
        proxy = await start_proxy(cfg)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        up.set_default(mode, after=3)
        with pytest.raises(openai.APIError):
            async for _ in await client.chat.completions.create(model="m", messages=MSG, temperature=0, stream=True):
                pass
        up.set_default("ok")
        await asyncio.sleep(0.05)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(
                model="m", messages=MSG, temperature=0, extra_headers={"x-edgeroute-cache": "only-if-cached"}
            )
        assert e.value.status_code == 504, "nothing of the broken stream was stored"
        await client.close()
    finally:
        await up.stop()


async def test_sampled_requests_bypass_unless_configured(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0.7)
        assert raw.headers["x-edgeroute-cache"] == "bypass"
    assert calls(up) == 2
    up2 = await start_upstream(record=True)
    proxy2 = await start_proxy(cached({"a": up2}, deterministic_only=False))
    client2 = openai.AsyncOpenAI(base_url=proxy2.url + "/v1", api_key="x")
    for _ in range(2):
        await client2.chat.completions.create(model="m", messages=MSG, temperature=0.7)
    assert calls(up2) == 1
    await client.close()
    await client2.close()


async def test_client_cache_directives(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")

    async def ask(headers: dict[str, str]) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, extra_headers=headers
        )
        return raw.headers["x-edgeroute-cache"]

    with pytest.raises(openai.APIStatusError) as e:
        await ask({"x-edgeroute-cache": "only-if-cached"})
    assert e.value.status_code == 504 and calls(up) == 0
    assert await ask({"Cache-Control": "no-store"}) == "miss"
    await asyncio.sleep(0.05)
    assert await ask({}) == "miss", "no-store: nothing was stored"
    await asyncio.sleep(0.05)
    assert await ask({"x-edgeroute-cache": "only-if-cached"}) == "hit"
    assert await ask({"x-edgeroute-cache": "bypass"}) == "bypass"
    assert await ask({"x-edgeroute-cache": "refresh"}) == "bypass"
    assert await ask({"Cache-Control": "no-cache"}) == "bypass"
    assert calls(up) == 5
    with pytest.raises(openai.BadRequestError) as bad:
        await ask({"x-edgeroute-cache": "yes-please"})
    assert "x-edgeroute-cache" in bad.value.message
    await client.close()


async def test_repeated_cache_header_lines_are_all_read(start_upstream, start_proxy) -> None:
    """HTTP folds repeated `Cache-Control` lines into one list: a `no-store` on the second line
    is still a `no-store`. Two `x-edgeroute-cache` lines that disagree are a 400, never a guess
    (a guess of `bypass` for `only-if-cached` would spend upstream)."""
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    url = proxy.url + "/v1/chat/completions"
    body = orjson.dumps({"model": "m", "messages": MSG, "temperature": 0})
    async with aiohttp.ClientSession() as s:

        async def post(*headers: tuple[str, str]) -> aiohttp.ClientResponse:
            h = [("content-type", "application/json"), *headers]
            async with s.post(url, data=body, headers=CIMultiDict(h)) as r:
                await r.read()
                return r

        assert (await post(("Cache-Control", "private"), ("Cache-Control", "no-store"))).headers[
            "x-edgeroute-cache"
        ] == "miss"
        await stored(proxy)
        assert (await post()).headers["x-edgeroute-cache"] == "miss", "no-store on a second line: nothing stored"
        await stored(proxy)
        assert (await post(("Cache-Control", "max-age=0"))).headers["x-edgeroute-cache"] == "bypass"
        assert (await post(("Cache-Control", "only-if-cached"))).headers["x-edgeroute-cache"] == "hit"
        spent = calls(up)
        r = await post(("x-edgeroute-cache", "refresh"), ("x-edgeroute-cache", "only-if-cached"))
        assert r.status == 400 and calls(up) == spent
        r = await post(("x-edgeroute-cache", "bypass"), ("x-edgeroute-cache", "yes-please"))
        assert r.status == 400 and calls(up) == spent
        assert (
            await post(
                ("x-edgeroute-cache", "hit-me"),
            )
        ).status == 400
        r = await post(("x-edgeroute-cache", "only-if-cached"), ("x-edgeroute-cache", "Only-If-Cached"))
        assert r.status == 200 and r.headers["x-edgeroute-cache"] == "hit", "the same directive twice is that directive"


async def test_entries_are_scoped_to_a_key_unless_configured(start_upstream, start_proxy) -> None:
    keys = {
        "alice": {"token": "tok-alice", "team": "red"},
        "bob": {"token": "tok-bob", "team": "red"},
        "carol": {"token": "tok-carol", "team": "blue"},
    }
    for scope, expected in (("key", 3), ("team", 2), ("global", 1)):
        up = await start_upstream(record=True)
        proxy = await start_proxy(cached({"a": up}, scope=scope) | {"keys": keys})
        for token in ("tok-alice", "tok-bob", "tok-carol"):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token)
            await client.chat.completions.create(model="m", messages=MSG, temperature=0)
            await asyncio.sleep(0.02)
            await client.close()
        assert calls(up) == expected, scope


async def test_stale_if_error_serves_an_expired_answer_when_every_deployment_fails(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, ttl=0.2, stale_if_error=30))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    fresh = await client.chat.completions.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.4)
    up.options.fail_status = 503
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "stale"
    assert raw.parse().choices[0].message.content == fresh.choices[0].message.content
    # Without stale-if-error, the outage is the client's answer.
    up2 = await start_upstream(record=True)
    proxy2 = await start_proxy(cached({"a": up2}, ttl=0.2))
    client2 = openai.AsyncOpenAI(base_url=proxy2.url + "/v1", api_key="x", max_retries=0)
    await client2.chat.completions.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.4)
    up2.options.fail_status = 503
    with pytest.raises(openai.APIStatusError) as e:
        await client2.chat.completions.create(model="m", messages=MSG, temperature=0)
    assert e.value.status_code == 502 and e.value.response.headers["x-edgeroute-cache"] == "miss"
    await client.close()
    await client2.close()


async def test_a_cached_answer_never_crosses_a_pii_rule(start_upstream, start_proxy) -> None:
    """One body, two instances sharing entries through Redis: the one without the PII rule
    (say, before the rule was rolled out to it) stores the public deployment's answer; the
    one with the rule must not serve it to the same body, which it may only send to the
    private deployment."""
    require_redis()
    public, private = await start_upstream(record=True), await start_upstream(record=True)
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    cfg = cached({"pub": public, "priv": private}, scope="global")
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    cfg["deployments"]["d-priv"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    cfg["shared_state"] = {"redis_url": REDIS_URL, "prefix": prefix}
    ruled = cfg | {"rules": [{"name": "pii", "when": {"pii": ["email"]}, "then": {"require_tags": ["privacy:high"]}}]}
    before, after = await start_proxy(cfg), await start_proxy(ruled)
    pii = [{"role": "user", "content": "Mail ann@example.com the capital of France."}]

    async def ask(proxy: Any) -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=pii, temperature=0)
        await stored(proxy)
        await client.close()
        return raw.headers["x-edgeroute-deployment"], raw.headers["x-edgeroute-cache"]

    assert await ask(before) == ("d-pub", "miss")
    assert await ask(before) == ("d-pub", "hit"), "the entry is shared"
    assert await ask(after) == ("d-priv", "miss"), "the public answer is not served under the rule"
    assert len(public.options.requests) == 1 and len(private.options.requests) == 1
    r = aioredis.Redis.from_url(REDIS_URL)
    await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")])
    await r.aclose()


async def test_a_body_seen_before_is_judged_by_each_callers_rules(start_upstream, start_proxy) -> None:
    """The core remembers what the rules found in a body (its PII, keywords) for the next time
    it comes, as a hit's body does; the conditions on the caller are judged afresh each time.
    One body with an email, sent by two teams under a rule only for `legal`: `eng`'s answer
    (from the public deployment) is never served to `legal`, whether the body was first
    judged for `eng` (the rule not reached: no PII looked for) or for `legal` (PII found)."""
    public, private = await start_upstream(record=True), await start_upstream(record=True)
    cfg = cached({"pub": public, "priv": private}, scope="global")
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    cfg["deployments"]["d-priv"]["price"] = {"input_per_mtok": 5.0, "output_per_mtok": 10.0}
    rule = {"teams": ["legal"], "pii": ["email"]}
    cfg["rules"] = [{"name": "legal-pii", "when": rule, "then": {"deployments": ["d-priv"]}}]
    cfg["keys"] = {"e": {"token": "tok-eng", "team": "eng"}, "l": {"token": "tok-legal", "team": "legal"}}
    proxy = await start_proxy(cfg)
    eng = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-eng", max_retries=0)
    legal = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-legal", max_retries=0)

    async def ask(client: openai.AsyncOpenAI, text: str) -> tuple[str, str]:
        msgs: Any = [{"role": "user", "content": text}]
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)
        await stored(proxy)
        return raw.headers["x-edgeroute-deployment"], raw.headers["x-edgeroute-cache"]

    first = "Mail ann@example.com the capital of France."
    assert await ask(eng, first) == ("d-pub", "miss")
    assert await ask(eng, first) == ("d-pub", "hit")
    assert await ask(legal, first) == ("d-priv", "miss")  # eng's answer is not legal's
    assert await ask(legal, first) == ("d-priv", "hit")
    second = "Mail bob@example.com the capital of Spain."
    assert await ask(legal, second) == ("d-priv", "miss")  # PII found for legal first
    assert await ask(eng, second) == ("d-priv", "hit")  # legal's answer is one eng may get
    assert await ask(legal, second) == ("d-priv", "hit")
    assert len(public.options.requests) == 1 and len(private.options.requests) == 2
    await eng.close()
    await legal.close()


async def test_oversized_answers_are_not_cached(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, reply_words=300)
    proxy = await start_proxy(cached({"a": up}, max_entry_bytes=500))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
        assert raw.headers["x-edgeroute-cache"] == "miss"
    for _ in range(2):  # streamed: its events are far above the bound, and counted alike
        async for _chunk in await client.chat.completions.create(model="m", messages=MSG, temperature=0, stream=True):
            pass
    await stored(proxy)
    assert calls(up) == 4 and proxy.app[CACHE].counters.too_large == 4
    await client.close()


async def test_anthropic_clients_get_hits_in_their_own_format(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x")
    msgs: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = {"temperature": 0}
    first = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=msgs, extra_body=greedy)
    second = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=msgs, extra_body=greedy)
    assert second.headers["x-edgeroute-cache"] == "hit" and calls(up) == 1
    a, b = await first.parse(), await second.parse()
    assert b.content[0].text == a.content[0].text and b.type == "message"  # type: ignore[union-attr]
    third = await client.messages.with_raw_response.create(model="m", max_tokens=50, messages=msgs, extra_body=greedy)
    assert (await third.parse()).model_dump() == b.model_dump(), "a later hit: the same answer"
    for _ in range(2):  # a stream hit, then one served from the stream rendered for the first
        text = ""
        async with client.messages.stream(model="m", max_tokens=50, messages=msgs, extra_body=greedy) as s:
            async for t in s.text_stream:
                text += t
            final = await s.get_final_message()
        assert text == a.content[0].text and calls(up) == 1  # type: ignore[union-attr]
        assert final.stop_reason == a.stop_reason and final.usage.output_tokens == a.usage.output_tokens
    await client.close()


async def test_instances_share_entries_through_redis(start_upstream, start_proxy) -> None:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = cached({"a": up}) | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}}
    one, two = await start_proxy(cfg), await start_proxy(cfg)
    c1 = openai.AsyncOpenAI(base_url=one.url + "/v1", api_key="x")
    c2 = openai.AsyncOpenAI(base_url=two.url + "/v1", api_key="x")
    await c1.chat.completions.create(model="m", messages=MSG, temperature=0)
    await asyncio.sleep(0.1)
    raw = await c2.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "hit" and calls(up) == 1
    # A corrupt entry is a miss (and a metric), never a bad answer.
    keys = [k async for k in r.scan_iter(f"{prefix}:cache:*")]
    assert len(keys) == 1
    await r.set(keys[0], b"\x78\x9cnot an entry")
    raw = await c2.chat.completions.with_raw_response.create(model="m", messages=MSG, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "miss" and calls(up) == 2
    assert two.app[CACHE].counters.corrupt == 1
    await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")])
    await r.aclose()
    await c1.close()
    await c2.close()


async def test_bad_cache_header_on_a_route_without_cache_is_still_a_400(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "m", "messages": MSG},
            headers={"x-edgeroute-cache": "\u00e9\u00e9"},
        ) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["param"] == "x-edgeroute-cache"
        async with s.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": MSG}) as r:
            assert r.status == 200 and "x-edgeroute-cache" not in r.headers


async def test_semantic_mode_reuses_a_paraphrase_but_never_a_near_miss(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, mode="semantic"))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    system = {"role": "system", "content": "You are a support assistant."}

    async def ask(text: str, sys: dict[str, str] = system) -> Any:
        msgs: Any = [sys, {"role": "user", "content": text}]
        return await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)

    first = await ask("How do I reset my password?")
    await stored(proxy)
    para = await ask("How can I reset my password?")
    assert para.headers["x-edgeroute-cache"] == "hit" and calls(up) == 1
    assert 0.91 <= float(para.headers["x-edgeroute-cache-similarity"]) < 1
    assert para.parse().choices[0].message.content == first.parse().choices[0].message.content
    # Near misses: the opposite action, another number, a negation, another language; and the
    # same question under another system prompt (everything but the last turn matches exactly).
    for text in (
        "How do I disable my password?",
        "How do I reset my 2 passwords?",
        "How do I not reset my password?",
        "Wie kann ich mein Passwort zurücksetzen?",
    ):
        raw = await ask(text)
        assert raw.headers["x-edgeroute-cache"] == "miss", text
        await asyncio.sleep(0.1)
    other_system = {"role": "system", "content": "You are a pirate."}
    raw = await ask("How can I reset my password?", other_system)
    assert raw.headers["x-edgeroute-cache"] == "miss"
    assert calls(up) == 6
    await client.close()


async def test_semantic_config_is_checked(start_upstream) -> None:
    up = await start_upstream()
    cfg = cached({"a": up}, mode="semantic", similarity=1.5)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(cfg, "test.yaml")
    assert "models.m.cache.similarity" in str(e.value)


async def test_cache_outcomes_are_metrics(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(cached({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    for _ in range(3):
        await client.chat.completions.create(model="m", messages=MSG, temperature=0)
        await asyncio.sleep(0.05)
    await client.chat.completions.create(model="m", messages=MSG, temperature=0.5)
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("edgeroute_cache_lookups_total", (("result", "hit"),))] == 2
    assert samples[("edgeroute_cache_lookups_total", (("result", "miss"),))] == 1
    assert samples[("edgeroute_cache_lookups_total", (("result", "bypass"),))] == 1
    assert samples[("edgeroute_cache_entries", ())] == 1 and samples[("edgeroute_cache_bytes", ())] > 0
    await client.close()


async def test_the_spend_report_shows_what_the_cache_saved(start_upstream, tmp_path) -> None:
    up = await start_upstream()
    db = tmp_path / "spend.db"
    cfg_path = tmp_path / "edge.yaml"
    cfg = cached({"a": up}) | {"ledger": {"path": str(db), "flush_interval": 0.1}}
    cfg_path.write_bytes(orjson.dumps(cfg))
    server = ProxyTestServer(create_app(config_mod.load(cfg_path), str(cfg_path)), host="127.0.0.1")
    await server.start_server()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x")
        for _ in range(4):
            await client.chat.completions.create(model="m", messages=MSG, temperature=0)
            await asyncio.sleep(0.05)
        await client.close()
        await asyncio.sleep(0.3)  # a flush interval
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.port}/admin/spend", params={"by": "outcome"}) as r:
                report = await r.json()
            async with s.get(f"http://127.0.0.1:{server.port}/admin/stats", params={"group_by": "cache"}) as r:
                stats = await r.json()
    finally:
        await server.close()
    rows = {row["outcome"]: row for row in report["rows"]}
    miss, hits = rows["ok"], rows["cache_hit"]
    assert hits["requests"] == hits["ok"] == 3 and hits["cost_usd"] == 0
    assert hits["savings_usd"] == pytest.approx(3 * miss["cost_usd"])
    # The stats say the same, by the cache's label.
    by = {row["group"]: row for row in stats["rows"]}
    assert set(by) == {"hit", "miss"} and by["hit"]["requests"] == 3 and by["miss"]["requests"] == 1
    assert by["hit"]["cost_usd"] == 0 and by["hit"]["savings_usd"] == pytest.approx(3 * miss["cost_usd"])


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: bytes, extra: bytes = b""
) -> tuple[dict[str, str], bytes]:
    """One chat request written by hand (HTTP/`version`), and its answer's headers and body."""
    body = orjson.dumps({"model": "m", "messages": MSG, "temperature": 0})
    writer.write(
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0].endswith(" 200 OK"), lines[0]
    got = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    return got, await reader.readexactly(int(got["content-length"]))


async def test_a_hit_is_framed_and_headed_as_a_miss_is(start_upstream, start_proxy) -> None:
    """A hit's answer (written from ready bytes) has the head a miss has, `Age` besides: the
    Server, Date, Content-Type and Content-Length headers, and the connection handling of
    HTTP/1.1 and of HTTP/1.0 with and without keep-alive."""
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    miss, miss_body = await _exchange(reader, writer, b"1.1")
    hit, hit_body = await _exchange(reader, writer, b"1.1")  # the same connection: kept alive
    assert (miss["x-edgeroute-cache"], hit["x-edgeroute-cache"]) == ("miss", "hit") and calls(up) == 1
    assert set(hit) == set(miss) | {"age"}, set(hit) ^ set(miss)
    assert hit_body == miss_body and int(hit["content-length"]) == len(hit_body)
    assert hit["server"] == "edgeroute" and hit["content-type"] == "application/json" and hit["date"]
    assert "connection" not in hit and "transfer-encoding" not in hit
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hit, _ = await _exchange(reader, writer, b"1.0", b"Connection: keep-alive\r\n")
    assert hit["x-edgeroute-cache"] == "hit" and hit["connection"].lower() == "keep-alive"
    hit, _ = await _exchange(reader, writer, b"1.0")  # HTTP/1.0 without keep-alive: the last answer
    assert hit["x-edgeroute-cache"] == "hit" and "connection" not in hit
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()
    assert calls(up) == 1


@pytest.mark.parametrize("careless", ["logprobs", "arguments_object", "reasoning", "empty_extras"])
async def test_an_answer_a_replay_cannot_give_back_whole_is_not_stored(
    serve_routes, start_proxy, careless: str
) -> None:
    """A cache replays answers from their text and tool calls. An answer with log
    probabilities or reasoning text (a replay would drop them), or with a tool call's
    `arguments` as a JSON object (some OpenAI-compatible servers send one; a stream replay
    could not frame it) is relayed as it came and never stored: the next request is a miss,
    streamed or not, never a 500. Empty extras (`annotations: []`, `audio: null`, as OpenAI
    sends them) are still cached."""
    served: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        body = await request.json()
        served.append(1)
        message: dict[str, Any] = {"role": "assistant", "content": "Paris."}
        logprobs = None
        if careless == "logprobs":
            logprobs = {"content": [{"token": "Paris", "logprob": -0.01, "bytes": [80], "top_logprobs": []}]}
        elif careless == "reasoning":
            message["reasoning_content"] = "The capital of France is Paris."
        elif careless == "empty_extras":
            message |= {"annotations": [], "audio": None, "refusal": None}
        else:
            call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
        completion = {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"]}
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if not body.get("stream"):
            return web.json_response(completion | {"choices": [choice], "usage": usage})
        head = completion | {"object": "chat.completion.chunk"}
        delta = {k: v for k, v in message.items() if k != "tool_calls"}
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": 0} | message["tool_calls"][0]]
        chunks = [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None},
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
        ]
        events = b"".join(b"data: " + orjson.dumps(head | {"choices": [c]}) + b"\n\n" for c in chunks)
        return web.Response(body=events + b"data: [DONE]\n\n", content_type="text/event-stream")

    up = await serve_routes(web.post("/v1/chat/completions", answer))
    cfg = {
        "providers": {"p": {"base_url": up.url + "/v1"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"], "cache": {"ttl": 60}, "max_attempts": 1}},
    }
    proxy = await start_proxy(cfg)
    payload = {"model": "m", "messages": MSG, "temperature": 0}
    if careless == "logprobs":
        payload["logprobs"] = True
    later = "hit" if careless == "empty_extras" else "miss"
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=payload) as r:
            first = await r.json()
            assert r.status == 200 and r.headers["x-edgeroute-cache"] == "miss"
        await stored(proxy)
        async with s.post(proxy.url + "/v1/chat/completions", json=payload | {"stream": True}) as r:
            await r.read()
            assert r.status == 200 and r.headers["x-edgeroute-cache"] == later
        await stored(proxy)
        async with s.post(proxy.url + "/v1/chat/completions", json=payload) as r:
            again = await r.json()
            assert r.status == 200 and r.headers["x-edgeroute-cache"] == later
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
    assert len(served) == (1 if careless == "empty_extras" else 3)
