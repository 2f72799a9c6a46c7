"""A request's `Cache-Control` bounds on what the cache may answer it with (RFC 9111 5.2.1).

Only `no-store`, `no-cache`, `max-age=0` and `only-if-cached` were read: a client sending
`max-age=10` was served a 5-minute-old answer, one sending `min-fresh=60` an answer about to
expire, and an HTTP/1.0 client's `Pragma: no-cache` was ignored. Now `max-age` and `min-fresh`
bound a hit, `max-age` and `max-stale` bound a stale-if-error answer (still given only when
every deployment fails), `Pragma: no-cache` without `Cache-Control` is a refresh, and an
invalid value is ignored (never a 400 or a 500).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from edgeroute.cache.service import CACHE
from tests.test_cache import MSG, cached, calls, stored


def _age_entries(proxy: Any, seconds: float) -> None:
    """Every entry of the in-memory store as if stored `seconds` before it was."""
    for lru in proxy.app[CACHE].store._routes.values():
        for item in lru.held.values():
            item.entry = dataclasses.replace(item.entry, created=item.entry.created - seconds)


async def _session(proxy: Any) -> tuple[aiohttp.ClientSession, Any]:
    session = aiohttp.ClientSession()
    url = proxy.url + "/v1/chat/completions"
    body = orjson.dumps({"model": "m", "messages": MSG, "temperature": 0})

    async def post(*headers: tuple[str, str]) -> tuple[int, str, int | None]:
        """(status, x-edgeroute-cache, Age)."""
        h = CIMultiDict([("content-type", "application/json"), *headers])
        async with session.post(url, data=body, headers=h) as r:
            await r.read()
            age = r.headers.get("Age")
            return r.status, r.headers.get("x-edgeroute-cache", ""), None if age is None else int(age)

    return session, post


async def test_max_age_and_min_fresh_bound_a_hit(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, ttl=60))
    session, post = await _session(proxy)
    try:
        assert (await post())[:2] == (200, "miss")
        await stored(proxy)
        _age_entries(proxy, 30)  # 30 s old, 30 s of freshness left
        paid = calls(up)
        # `no-store` alongside, so that the 30-second-old entry stays for the next asks.
        assert await post(("Cache-Control", "max-age=10, no-store")) == (200, "miss", None), "older than max-age"
        assert calls(up) == paid + 1
        status, label, age = await post(("Cache-Control", "max-age=45"))
        assert (status, label) == (200, "hit") and age is not None and age >= 30
        assert (await post(("Cache-Control", "min-fresh=40, no-store")))[:2] == (200, "miss"), "30 s left < 40"
        assert (await post(("Cache-Control", "min-fresh=20")))[:2] == (200, "hit")
        assert (await post(("Cache-Control", 'max-age="20", no-store')))[:2] == (200, "miss"), "the quoted form"
        assert (await post(("Cache-Control", "private"), ("Cache-Control", "max-age=100,max-age=5, no-store")))[:2] == (
            200,
            "miss",
        ), "a repeated bound: the stricter"
        paid = calls(up)
        status, _, _ = await post(("Cache-Control", "max-age=5, only-if-cached"))
        assert status == 504 and calls(up) == paid, "only-if-cached: 504, never an upstream call"
        assert (await post(("Cache-Control", "max-age=40, only-if-cached")))[:2] == (200, "hit")
        # Invalid values are ignored (RFC 9111 4.2.1): a hit, never a 400 or a 500.
        for bad in (
            "max-age=-5",
            "max-age=abc",
            "max-age=",
            "max-age=1.5",
            "min-fresh=1e3",
            "max-age=" + "9" * 5000,  # more digits than int() takes: the largest value, 2^31
            "max-age=99999999999999999999",
            "min-fresh=-1, max-stale=x, max-age",
            "max-age=\u0661\u0662",  # Arabic-Indic digits are not delta-seconds
        ):
            assert (await post(("Cache-Control", bad)))[:2] == (200, "hit"), bad
        assert calls(up) == paid
    finally:
        await session.close()


async def test_pragma_no_cache_is_a_refresh_unless_cache_control_is_sent(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}))
    session, post = await _session(proxy)
    try:
        assert (await post())[:2] == (200, "miss")
        await stored(proxy)
        paid = calls(up)
        assert (await post(("Pragma", "no-cache")))[:2] == (200, "bypass")
        assert calls(up) == paid + 1, "Pragma: no-cache asks upstream again"
        await stored(proxy)
        assert (await post(("Pragma", "no-cache"), ("Cache-Control", "max-age=100")))[:2] == (200, "hit")
        assert (await post(("Pragma", "x-other")))[:2] == (200, "hit")
        assert calls(up) == paid + 1
    finally:
        await session.close()


async def test_max_age_and_max_stale_bound_a_stale_answer(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(cached({"a": up}, ttl=60, stale_if_error=600))
    session, post = await _session(proxy)
    try:
        assert (await post())[:2] == (200, "miss")
        await stored(proxy)
        _age_entries(proxy, 100)  # 40 s past its ttl, within stale-if-error
        assert (await post(("Cache-Control", "max-stale=100, no-store")))[:2] == (200, "miss"), "no stale hit"
        up.options.fail_status = 503
        status, label, age = await post()
        assert (status, label) == (200, "stale") and age is not None and age >= 100
        assert (await post(("Cache-Control", "max-stale")))[:2] == (200, "stale")
        assert (await post(("Cache-Control", "max-stale=50")))[:2] == (200, "stale")
        assert (await post(("Cache-Control", "max-stale=20")))[1] == "miss", "40 s stale > max-stale=20"
        assert (await post(("Cache-Control", "max-age=90, max-stale")))[1] == "miss", "older than max-age"
        assert (await post(("Cache-Control", "max-age=120")))[:2] == (200, "stale")
    finally:
        await session.close()
