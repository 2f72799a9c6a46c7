"""Semantic cache false hits an attacker (or an unlucky user) finds in minutes: a number
spelled out, a negating prefix, an antonym the guard list lacked. Each second request of a
pair asks something else and must reach the upstream; a true paraphrase still hits."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.conftest import simple_config

_PREAMBLE = "".join(f"Step {w}: go to the {w} folder. " for w in "abcdefghijklmnopq").replace("Step", "Then")

# (cached first, asked second): every one a hit at similarity 0.91-0.97 before the guards knew it.
NEAR_MISSES = [
    ("Transfer one hundred dollars to Bob", "Transfer one thousand dollars to Bob"),
    ("List three benefits of exercise", "List four benefits of exercise"),
    ("Is it safe to take ibuprofen with alcohol?", "Is it unsafe to take ibuprofen with alcohol?"),
    ("Write a python function to sort a list ascending", "Write a python function to sort a list descending"),
    # The same words the other way round (static embeddings see no order: similarity 1.000),
    # a decimal comma, an exponent, a comparison.
    ("Convert 100 USD to EUR", "Convert 100 EUR to USD"),
    ("convert 5 km to miles", "convert 5 miles to km"),
    ("Is Rust faster than Go?", "Is Go faster than Rust?"),
    ("How much is 1,25 euros in dollars?", "How much is 125 euros in dollars?"),
    ("Set the timeout to 1e3 ms", "Set the timeout to 1e6 ms"),
    ("Is x > 5 in this code: if x > 5: print(x)", "Is x < 5 in this code: if x < 5: print(x)"),
    ("convert 250 mg to g", "convert 250 g to mg"),  # one-letter words are words
    # Past the 16 connectors whose neighbours are kept one by one, all of them must match.
    (
        _PREAMBLE + "Copy the file from the laptop to the server.",
        _PREAMBLE + "Copy the file from the server to the laptop.",
    ),
]


async def test_near_misses_of_number_words_negating_prefixes_and_antonyms_are_misses(
    start_upstream: Any, start_proxy: Any
) -> None:
    pytest.importorskip("wordllama")
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 60, "mode": "semantic"}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def cache_of(text: str) -> str:
        msgs: Any = [{"role": "user", "content": text}]
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)
        await asyncio.sleep(0.1)  # the entry is indexed after the answer
        return raw.headers["x-edgeroute-cache"]

    got = []
    for first, second in NEAR_MISSES:
        assert await cache_of(first) == "miss"
        got.append((second, await cache_of(second)))
    assert got == [(second, "miss") for _, second in NEAR_MISSES]
    # What the guards must still let through: the same question in other words.
    assert await cache_of("Is it not safe to take ibuprofen with alcohol?") == "hit"
    assert await cache_of("In Python, how do I sort a list?") == "miss"
    assert await cache_of("How do I sort a list in Python?") == "hit", "words moved, none across a connector"
    assert len(up.options.requests) == 2 * len(NEAR_MISSES) + 1
    await client.close()
