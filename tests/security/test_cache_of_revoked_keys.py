"""What a revoked key stored in the response cache goes with it.

A managed key revoked today (leaked, or its holder gone) left its cached answers in the cache
until their ttl: with `scope: key`, its prompts' answers stayed in memory or Redis, reachable
by nobody, and the shared semantic index's records (its prompts' numbers, names, quoted text)
stayed in Redis; with `scope: team` or `global`, what it had put in the cache went on being
served to every other key. Now a revocation drops every entry the key's requests stored (and
those of the keys it made, which end with it), in every scope: in this process, in Redis,
and the semantic records pointing at them. Other keys' entries stay.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from tests.conftest import eventually, simple_config
from tests.governance_support import instances, write_config
from tests.security.governed import ROOT, call
from tests.test_cost_support import REDIS_URL, require_redis

PRIVATE = "Please close the account 4920-5567-1180 of Marta Kowalska today."
OTHER = "How long does Bavarian rye bread bake at 230 degrees?"


def _config(up: Any, tmp_path: Path, **cache: Any) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 3600} | cache
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    return cfg


async def _ask(url: str, token: str, text: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}], temperature=0
        )
        return str(raw.headers["x-edgeroute-cache"])
    finally:
        await client.close()


async def _only_if_cached(url: str, token: str, text: str) -> int:
    """The status of a request that may be answered from the cache alone (a miss stores nothing)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": text}],
            temperature=0,
            extra_headers={"x-edgeroute-cache": "only-if-cached"},
        )
        return 200
    except openai.APIStatusError as e:
        return e.status_code
    finally:
        await client.close()


async def _redis() -> aioredis.Redis:
    return aioredis.Redis.from_url(require_redis())


@pytest.mark.parametrize("mode", ["exact", "semantic"])
async def test_a_revoked_keys_entries_leave_a_shared_cache(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, mode: str
) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, tmp_path, scope="global", mode=mode))
    keys = proxy.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, leaked = await call(s, "POST", keys, ROOT, {"name": "laptop", "role": "admin"})
        assert status == 201
        status, made = await call(s, "POST", keys, leaked["secret"], {"name": "made-by-laptop"})
        assert status == 201
        status, other = await call(s, "POST", keys, ROOT, {"name": "other"})
        assert status == 201
        assert await _ask(proxy.url, made["secret"], PRIVATE) == "miss"
        assert await _ask(proxy.url, leaked["secret"], OTHER + " Quickly.") == "miss"
        assert await _ask(proxy.url, other["secret"], OTHER) == "miss"

        async def stored() -> bool:
            return await _ask(proxy.url, other["secret"], PRIVATE) == "hit"

        await eventually(stored, "the premise: another key is served the answer the key made stored")
        calls = len(up.options.requests)

        status, _ = await call(s, "DELETE", keys + f"/{leaked['id']}", ROOT)
        assert status == 200
        # What the revoked key and the key it made stored is gone; the other key's stays.
        assert await _ask(proxy.url, other["secret"], PRIVATE) == "miss"
        assert await _ask(proxy.url, other["secret"], OTHER) == "hit"
        assert len(up.options.requests) == calls + 1


async def test_an_expired_keys_entries_leave_the_cache(start_upstream: Any, start_proxy: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    proxy = await start_proxy(_config(up, tmp_path, scope="global"))
    keys = proxy.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, brief = await call(s, "POST", keys, ROOT, {"name": "contractor", "expires_at": time.time() + 3})
        assert status == 201
        status, stays = await call(s, "POST", keys, ROOT, {"name": "staying"})
        assert status == 201
    assert await _ask(proxy.url, brief["secret"], PRIVATE) == "miss"
    assert await _ask(proxy.url, stays["secret"], OTHER) == "miss"
    assert await _only_if_cached(proxy.url, stays["secret"], PRIVATE) == 200  # the premise

    async def dropped() -> bool:
        return await _only_if_cached(proxy.url, stays["secret"], PRIVATE) == 504

    await eventually(dropped, "the expired key's entry dropped", within=10, every=0.2)
    assert await _only_if_cached(proxy.url, stays["secret"], OTHER) == 200


async def test_a_revoked_keys_entries_and_records_leave_redis(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    r = await _redis()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream(record=True)
    cfg = _config(up, tmp_path, mode="semantic") | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}}
    proxy = await start_proxy(cfg)
    keys = proxy.url + "/admin/keys"
    stream = f"{prefix}:cache:sem:-:m"

    async def records() -> str:
        return " ".join(zlib.decompress(f[b"r"]).decode("utf-8", "ignore") for _, f in await r.xrange(stream))

    async def names() -> set[str]:
        return {k.decode().rsplit(":", 1)[1] async for k in r.scan_iter(f"{prefix}:cache:m:*")}

    async def entries() -> int:
        return len(await names())

    try:
        async with aiohttp.ClientSession() as s:
            status, gone = await call(s, "POST", keys, ROOT, {"name": "leaving"})
            assert status == 201
            status, stays = await call(s, "POST", keys, ROOT, {"name": "staying"})
            assert status == 201
            assert await _ask(proxy.url, gone["secret"], PRIVATE) == "miss"

            async def one() -> bool:
                return await entries() == 1

            await eventually(one, "the premise: the leaving key's answer in Redis")
            (private,) = await names()
            assert await _ask(proxy.url, stays["secret"], OTHER) == "miss"

            async def both_held() -> bool:
                text = await records()
                return await entries() == 2 and all(k in text for k in await names())

            await eventually(both_held, "the premise: both answers and their records in Redis")
            (other,) = await names() - {private}
            assert await _ask(proxy.url, gone["secret"], PRIVATE) == "hit"

            status, _ = await call(s, "DELETE", keys + f"/{gone['id']}", ROOT)
            assert status == 200
            left = await records()
            assert private not in left, "the revoked key's prompt's record stayed in Redis"
            assert other in left and await names() == {other}
            assert await _ask(proxy.url, stays["secret"], OTHER) == "hit"
    finally:
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
        await r.aclose()


async def _keys_on_both(a: str, b: str, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two keys made at instance `a`, "leaving" and "staying", once `b` serves the first (its
    question `text` answered there, a miss)."""
    async with aiohttp.ClientSession() as s:
        status, gone = await call(s, "POST", a + "/admin/keys", ROOT, {"name": "leaving"})
        assert status == 201
        status, stays = await call(s, "POST", a + "/admin/keys", ROOT, {"name": "staying"})
        assert status == 201

    async def seen_on_b() -> bool:
        try:
            return await _ask(b, gone["secret"], text) == "miss"
        except openai.AuthenticationError:
            return False  # B has not read the new key yet

    await eventually(seen_on_b, "B serving the new key")
    return gone, stays


async def test_another_instance_drops_a_revoked_keys_entries_from_its_memory(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Two `edgeroute serve` instances, each with its own in-memory cache: the one that did not
    revoke the key drops its entries when its poll sees the revocation."""
    up = await start_upstream()
    shared = {"redis_url": require_redis(), "prefix": "edgeroute-test-" + os.urandom(4).hex()}
    cfg = _config(up, tmp_path, scope="global", mode="semantic")
    cfg |= {"shared_state": shared, "cache": {"backend": "memory"}}
    cfg.pop("ledger")  # the default, beside the config file: both instances share it
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 2)
    a, b = await asyncio.to_thread(cm.__enter__)
    try:
        gone, stays = await _keys_on_both(a.url, b.url, PRIVATE)

        async def cached_on_b() -> int:
            return await _only_if_cached(b.url, stays["secret"], PRIVATE)

        assert await cached_on_b() == 200  # the premise: B serves the leaving key's answer to others
        async with aiohttp.ClientSession() as s:
            status, _ = await call(s, "DELETE", a.url + f"/admin/keys/{gone['id']}", ROOT)
            assert status == 200

        async def dropped_on_b() -> bool:
            return await cached_on_b() == 504

        await eventually(dropped_on_b, "B dropping the revoked key's entry", within=5)
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)


async def test_a_keys_set_of_what_it_stored_holds_only_live_entries(
    start_upstream: Any, start_proxy: Any, tmp_path: Path
) -> None:
    """The names of what a key stored (for its revocation to find) are kept in Redis while the
    entries live: a key that stores all day does not grow a set of long-expired names."""
    r = await _redis()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream()
    cfg = _config(up, tmp_path, ttl=2) | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}}
    proxy = await start_proxy(cfg)
    try:
        async with aiohttp.ClientSession() as s:
            status, busy = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"name": "busy"})
            assert status == 201
        owned = f"{prefix}:cache-owner:{busy['id']}"

        async def names() -> list[str]:  # whatever the set's type (it was a plain set)
            kind = await r.type(owned)
            members = await (r.smembers(owned) if kind == b"set" else r.zrange(owned, 0, -1))
            return [m.decode() for m in members]

        async def entries() -> list[str]:
            return [k.decode() async for k in r.scan_iter(f"{prefix}:cache:m:*")]

        assert await _ask(proxy.url, busy["secret"], "question 0") == "miss"

        async def first_named() -> bool:
            return len(await names()) == 1 and len(await entries()) == 1

        await eventually(first_named, "the first entry named in the key's set")
        (first,) = await entries()

        async def half_gone() -> bool:
            return 0 < int(await r.pttl(first)) < 1200

        await eventually(half_gone, "the first entry half through its ttl (2 s)", every=0.05)
        # The key keeps storing: a second entry while the first lives, a third once it expired.
        assert await _ask(proxy.url, busy["secret"], "question 1") == "miss"

        async def expired() -> bool:
            return not await r.exists(first)

        await eventually(expired, "the first entry expiring", within=10, every=0.05)
        assert await _ask(proxy.url, busy["secret"], "question 2") == "miss"

        async def third_named() -> bool:
            return len(await entries()) == 2 and len([n for n in await names() if not n.endswith(first)]) == 2

        await eventually(third_named, "the second and third entries named in the key's set")
        assert not [n for n in await names() if n.endswith(first)], "an expired entry's name stayed in the set"
    finally:
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
        await r.aclose()


async def _revoke_in_flight(up: Any, asked: str, admin: str, gone: dict[str, Any], latency_ms: int = 1000) -> None:
    """The key `gone` asks `asked` a question the upstream takes `latency_ms` to answer, and is
    revoked at `admin` meanwhile; its answer is still given (it was paid for)."""
    up.options.latency_ms = latency_ms
    slow = asyncio.create_task(_ask(asked, gone["secret"], PRIVATE))
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as s:
        status, _ = await call(s, "DELETE", admin + f"/admin/keys/{gone['id']}", ROOT)
        assert status == 200
    assert await slow == "miss"
    up.options.latency_ms = 0
    await asyncio.sleep(0.5)  # when its answer would have been stored


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_an_answer_in_flight_when_its_key_is_revoked_is_not_stored(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, backend: str
) -> None:
    """The entries a key stored went at its revocation, but the answer of its request then in
    flight was stored after it, and served to the team for the ttl."""
    up = await start_upstream()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    cfg = _config(up, tmp_path, scope="team")
    if backend == "redis":
        cfg["shared_state"] = {"redis_url": require_redis(), "prefix": prefix}
    proxy = await start_proxy(cfg)
    keys = proxy.url + "/admin/keys"
    try:
        async with aiohttp.ClientSession() as s:
            status, gone = await call(s, "POST", keys, ROOT, {"name": "leaving", "team": "research"})
            assert status == 201
            status, stays = await call(s, "POST", keys, ROOT, {"name": "staying", "team": "research"})
            assert status == 201
        assert await _ask(proxy.url, gone["secret"], OTHER) == "miss"
        assert await _only_if_cached(proxy.url, stays["secret"], OTHER) == 200  # the premise: the team shares
        await _revoke_in_flight(up, proxy.url, proxy.url, gone)
        assert await _only_if_cached(proxy.url, stays["secret"], OTHER) == 504
        assert await _only_if_cached(proxy.url, stays["secret"], PRIVATE) == 504, "stored after the revocation"
    finally:
        if backend == "redis":
            r = await _redis()
            await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
            await r.aclose()


async def test_an_answer_in_flight_on_another_instance_is_not_stored(start_upstream: Any, tmp_path: Path) -> None:
    """Two instances sharing the cache in Redis: one revokes the key and drops what it stored
    while the other, which has not polled the revocation yet, still answers a request of it."""
    up = await start_upstream()
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    cfg = _config(up, tmp_path, scope="global")
    cfg["shared_state"] = {"redis_url": require_redis(), "prefix": prefix}
    cfg["governance"]["key_poll_interval"] = 1  # the other instance learns of the revocation late
    cfg.pop("ledger")  # the default, beside the config file: both instances share it
    cm = instances(write_config(tmp_path / "edgeroute.yaml", cfg), 2)
    a, b = await asyncio.to_thread(cm.__enter__)
    try:
        gone, stays = await _keys_on_both(a.url, b.url, OTHER)
        await _revoke_in_flight(up, b.url, a.url, gone, latency_ms=600)  # ends before B's poll, mostly
        assert await _only_if_cached(a.url, stays["secret"], PRIVATE) == 504, "stored after the revocation"
        assert await _only_if_cached(b.url, stays["secret"], PRIVATE) == 504
    finally:
        await asyncio.to_thread(cm.__exit__, None, None, None)
        r = await _redis()
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or [f"{prefix}:none"])
        await r.aclose()
