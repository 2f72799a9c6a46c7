"""How long the shared semantic index keeps what it holds of a prompt (cache entries in Redis).

Each record of the index's Redis stream holds a prompt's guards (since session 26 as a
digest; before, its numbers, capitalised names, quoted text and code in plain text) and its
answer's key. The stream was trimmed to `max_entries` and its expiry pushed back by every new
record, so with steady traffic a prompt's record stayed in Redis long after the answer it
pointed to had expired (until `max_entries` newer ones pushed it out). A record older than the
route's ttl (with stale-if-error) is now trimmed when the next one is added.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import openai
import redis.asyncio as aioredis

from tests.conftest import eventually, simple_config
from tests.test_cost_support import REDIS_URL, require_redis

PRIVATE = "Please close the account 4920-5567-1180 of Marta Kowalska today."
LATER = "How long does Bavarian rye bread bake at 230 degrees?"


async def test_a_prompts_guards_do_not_outlive_its_answer_in_redis(start_upstream: Any, start_proxy: Any) -> None:
    r = aioredis.Redis.from_url(require_redis())
    prefix = "edgeroute-test-" + os.urandom(4).hex()
    up = await start_upstream()
    cfg = simple_config({"a": up}) | {"shared_state": {"redis_url": REDIS_URL, "prefix": prefix}}
    cfg["models"]["m"]["cache"] = {"mode": "semantic", "ttl": 1}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = f"{prefix}:cache:sem:-:m"

    async def records() -> str:
        return " ".join(zlib.decompress(f[b"r"]).decode("utf-8", "ignore") for _, f in await r.xrange(stream))

    async def ask(text: str) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}], temperature=0
        )
        return raw.headers["x-edgeroute-cache"]

    try:
        assert await ask(PRIVATE) == "miss"

        async def entry_names() -> list[bytes]:
            return [k async for k in r.scan_iter(f"{prefix}:cache:m:*")]

        async def stored() -> bool:
            return len(await entry_names()) == 1

        await eventually(stored, "the premise: the answer in Redis")
        (entry,) = await entry_names()
        private = entry.decode().rsplit(":", 1)[1]

        async def held() -> bool:
            return private in await records()

        await eventually(held, "the premise: a record points at the answer")
        # The record keeps a digest of the prompt's guards, not its name or account number.
        assert "kowalska" not in (await records()).lower() and "4920" not in await records()
        fillers = iter(range(1000))

        async def answer_gone() -> bool:  # meanwhile traffic goes on: other answers, other records
            assert await ask(f"What is the capital of Country {next(fillers)}?") == "miss"
            return not await r.exists(entry)

        await eventually(answer_gone, "the answer expired (ttl 1 s)", within=10, every=0.2)
        assert await ask(LATER) == "miss"

        async def trimmed() -> bool:
            return private not in await records()

        await eventually(trimmed, "the prompt's record goes when the next is added after its answer expired")
    finally:
        await client.close()
        await r.delete(*[k async for k in r.scan_iter(f"{prefix}:*")] or ["-"])
        await r.aclose()
