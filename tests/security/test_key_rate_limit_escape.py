"""Rate-limit escape through managed keys: a key held to `rpm` (or `tpm`) that creates keys.

A managed key may create keys of at most its own rate limits, but each new key had buckets
of its own: a key held to 3 requests a minute that minted ten keys of 3 a minute sent 33.
As for budgets, a managed key's rate limits now bound what it and every key below it send
together: each request takes from its own key's buckets and from each managed ancestor's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai

from tests.security.governed import ROOT, USER, call


async def _sent(url: str, secret: str, n: int) -> int:
    """How many of `n` requests (made at once) the proxy served."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)

    async def one() -> bool:
        try:
            await client.chat.completions.create(model="m", messages=USER)
            return True
        except openai.RateLimitError:
            return False

    try:
        return sum(await asyncio.gather(*(one() for _ in range(n))))
    finally:
        await client.close()


async def test_keys_made_by_a_rate_limited_key_share_its_limit(governed: Any) -> None:
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        status, lead = await call(s, "POST", keys, ROOT, {"name": "lead", "role": "admin", "rpm": 3})
        assert status == 201, lead
        children = []
        for i in range(4):
            status, child = await call(
                s, "POST", keys, lead["secret"], {"name": f"c{i}", "role": "admin" if i == 0 else "service", "rpm": 3}
            )
            assert status == 201, child
            children.append(child)
        status, grandchild = await call(
            s, "POST", keys, children[0]["secret"], {"name": "g", "role": "service", "rpm": 2}
        )
        assert status == 201, grandchild
    served = [await _sent(governed.url, c["secret"], 3) for c in (*children, grandchild)]
    served.append(await _sent(governed.url, lead["secret"], 3))
    # Three a minute for the lead and everything below it, not three per key (17 here).
    assert sum(served) == 3, served


async def test_a_key_of_the_config_file_bounds_only_itself(governed: Any) -> None:
    """The operator's own keys are not managed keys: keys they create have buckets of their
    own (as their budgets do), so the rule above does not starve a config key's children."""
    keys = governed.url + "/admin/keys"
    async with aiohttp.ClientSession() as s:
        made = []
        for i in range(2):
            status, k = await call(s, "POST", keys, ROOT, {"name": f"s{i}", "role": "service", "rpm": 2})
            assert status == 201, k
            made.append(k)
    assert [await _sent(governed.url, k["secret"], 3) for k in made] == [2, 2]
