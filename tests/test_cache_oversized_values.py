"""A value in the shared cache store larger than any entry edgeroute writes is not read whole.

The read of an entry was a plain `GET`: a value of hundreds of megabytes planted under an
entry's name (by whoever can write to Redis, or a bug elsewhere) was read whole on the event
loop, then copied and checked (256 MiB: 1.3 s of the loop, a gigabyte of memory, for each
request that named it), before being found no entry. Now a read takes at most the largest
value edgeroute writes for the route (its `max_entry_bytes`, with the header, compressed,
signed); a longer one is an invalid entry, counted and deleted, and the request a miss. (Read whole, such a value
outlasted the Redis timeout: a "Redis unavailable" miss, the value left in place for the next
request to read again.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis

from edgeroute.cache.stores import value_cap
from tests.conftest import eventually
from tests.metrics_support import scrape
from tests.test_cache import MSG, cached, calls, stored
from tests.test_cache_planted_entries import redis_prefix  # noqa: F401 (the fixture)
from tests.test_cost_support import REDIS_URL

_PLANTED = 128 << 20


@contextlib.asynccontextmanager
async def _counting_link(url: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP relay to the Redis at `url`: (the URL to reach it through the relay, [bytes it
    carried from Redis])."""
    target = urlsplit(url)
    carried = [0]

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port or 6379)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(1 << 16):
                    carried[0] += len(data) if count else 0
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield target._replace(netloc=f"127.0.0.1:{port}").geturl(), carried
    finally:
        server.close()


async def test_an_oversized_value_is_not_read_whole(
    start_upstream: Any,
    start_proxy: Any,
    redis_prefix: tuple[aioredis.Redis, str],  # noqa: F811
) -> None:
    r, prefix = redis_prefix
    up = await start_upstream(record=True)
    async with _counting_link(REDIS_URL) as (url, carried):
        cfg = cached({"a": up}) | {"shared_state": {"redis_url": url, "prefix": prefix}}
        await _asked(await start_proxy(cfg), up, r, prefix, carried)


async def _asked(proxy: Any, up: Any, r: aioredis.Redis, prefix: str, carried: list[int]) -> None:
    body = orjson.dumps({"model": "m", "messages": MSG, "temperature": 0})
    async with aiohttp.ClientSession() as s:

        async def ask() -> tuple[int, str]:
            headers = {"content-type": "application/json"}
            async with s.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as got:
                await got.read()
                return got.status, got.headers["x-edgeroute-cache"]

        assert await ask() == (200, "miss")
        await stored(proxy)
        (name,) = [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]
        await r.set(name, b"x" * _PLANTED, keepttl=True)
        before = carried[0]
        assert await ask() == (200, "miss") and calls(up) == 2
        sent = carried[0] - before
        assert sent < value_cap(1 << 20) + (1 << 20), f"Redis sent {sent} bytes for one lookup (max_entry_bytes: 1 MiB)"
        errors = await scrape(proxy.url)
        # Not a Redis timeout (the whole value read until the pipe's deadline, then left there to
        # be read again by the next request), but a value that is no entry: deleted.
        assert errors.value("edgeroute_cache_store_errors_total", kind="unavailable") == 0
        assert errors.value("edgeroute_cache_store_errors_total", kind="invalid") == 1

        async def gone() -> bool:
            return await r.strlen(name) < _PLANTED

        await eventually(gone, "the oversized value deleted")
        await stored(proxy)
        assert await ask() == (200, "hit"), "the answer asked again is stored over it"
