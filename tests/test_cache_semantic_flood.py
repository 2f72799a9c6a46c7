"""One tenant's flood of long turns does not hold every tenant's semantic lookups.

The semantic cache embeds last user turns on one thread for every tenant, first come first
served. A key sending many long turns (32 KiB, the most that is embedded) with
`x-edgeroute-cache: only-if-cached` (free: a 504, no upstream call, no budget) queued ahead of
every other tenant's lookups: another team's paraphrase waited seconds. Now a tenant's turns
waiting for the thread hold at most 64 KiB (its further turns are matched exactly only), and
a turn that cannot start within half a second is matched exactly only.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import openai
import orjson

from tests.conftest import simple_config
from tests.test_cache import stored

SYSTEM = {"role": "system", "content": "You are a support assistant."}
FLOOD_S = 6.0  # the flood's length at most (and at most FLOOD_MAX requests)
FLOOD_MAX = 2000


def _long_turns(n: int) -> list[bytes]:
    rng = random.Random(7)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    return [
        orjson.dumps(
            {"model": "m", "messages": [SYSTEM, {"role": "user", "content": _text(rng, words)}], "temperature": 0}
        )
        for _ in range(n)
    ]


def _text(rng: random.Random, words: list[str]) -> str:
    out = " ".join(rng.choices(words, k=6000))
    return out[: 32 * 1024 - 16]


async def test_a_flood_of_long_turns_does_not_hold_another_tenants_lookups(
    start_upstream: Any, start_proxy: Any
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 600, "mode": "semantic"}
    cfg["keys"] = {
        "flood": {"token": "tok-flood", "team": "red"},
        "carol": {"token": "tok-carol", "team": "blue"},
    }
    proxy = await start_proxy(cfg)
    carol = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-carol", max_retries=0)

    async def ask(text: str) -> tuple[float, str]:
        started = time.perf_counter()
        raw = await carol.chat.completions.with_raw_response.create(
            model="m", messages=[SYSTEM, {"role": "user", "content": text}], temperature=0
        )
        return time.perf_counter() - started, raw.headers["x-edgeroute-cache"]

    assert (await ask("How do I reset my password?"))[1] == "miss"
    await stored(proxy)
    bodies, sent, codes = _long_turns(400), [0], {}
    stop = time.monotonic() + FLOOD_S
    headers = {
        "Authorization": "Bearer tok-flood",
        "x-edgeroute-cache": "only-if-cached",
        "Content-Type": "application/json",
    }

    async def flood(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop and sent[0] < FLOOD_MAX:
            body, sent[0] = bodies[sent[0] % len(bodies)], sent[0] + 1
            async with s.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                codes[r.status] = codes.get(r.status, 0) + 1

    async with aiohttp.ClientSession() as s:
        flooding = [asyncio.create_task(flood(s)) for _ in range(64)]
        await asyncio.sleep(1.0)  # the thread's queue full of the flood's turns
        waits = []
        for text in ("How can I reset my password?", "How could I reset my password?"):
            waited, label = await ask(text)
            waits.append(waited)
            assert label == "hit", "a paraphrase missed while another tenant flooded"
        await asyncio.gather(*flooding)
    assert set(codes) == {504} and sent[0] >= 64, codes
    assert max(waits) < 1.0, f"another tenant's semantic lookups waited {waits} s behind the flood"
    await carol.close()
