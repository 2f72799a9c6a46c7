"""A careless upstream's usage with counts no answer has (negative, 1e30, past 2**40): the
ledger never took them (it counts the answer instead), but the client was shown them as they
came, and the cache replayed them to every later caller. A JSON answer now carries the count
edgeroute made, a stream's usage chunk none (`usage: null`), fresh or from the cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

from tests.conftest import eventually
from tests.security.conftest import priced_config, usage_upstream

ABSURD = [
    {"prompt_tokens": -1_000_000, "completion_tokens": 5, "total_tokens": -999_995},
    {"prompt_tokens": 3, "completion_tokens": 1e30, "total_tokens": 1e30},
    {"prompt_tokens": 3, "completion_tokens": 2**62, "total_tokens": 2**62 + 3},
    {"prompt_tokens": 3, "completion_tokens": 1e308, "total_tokens": 1e308},
]
USER = [{"role": "user", "content": "hi"}]


def _sane(u: Any) -> bool:
    counts = (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    return all(isinstance(c, int) and 0 <= c < 1 << 40 for c in counts)


@pytest.mark.parametrize("usage", ABSURD)
async def test_absurd_counts_never_reach_a_client(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Any]], usage: dict[str, Any]
) -> None:
    async with usage_upstream(usage) as base:
        cfg = priced_config(base)
        cfg["models"]["m"]["cache"] = {"ttl": 60}
        proxy = await start_proxy(cfg)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        try:
            for label in ("miss", "hit"):
                raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER, temperature=0)
                got = raw.parse()
                assert raw.headers["x-edgeroute-cache"] == label
                assert got.choices[0].message.content == "hello" and got.usage is not None and _sane(got.usage)
                assert got.usage.completion_tokens == 1  # "hello", counted
            for label in ("miss", "hit"):
                raw_s = await client.chat.completions.with_raw_response.create(
                    model="m",
                    messages=USER,
                    temperature=0.0,  # another entry than the JSON one's
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = [c async for c in raw_s.parse()]
                assert raw_s.headers["x-edgeroute-cache"] == label
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
                assert all(_sane(c.usage) for c in chunks if c.usage is not None)
        finally:
            await client.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_absurd_total_beside_sound_counts_keeps_them(
    start_proxy: Callable[[dict[str, Any]], Awaitable[Any]], stream: bool
) -> None:
    """Only the total is garbage: the prompt and completion counts stand (4,990 reasoning
    tokens the text does not show among them), with the total they make. A stream's usage was
    dropped whole and its answer counted from its text: billed 417 times less."""
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5000,
        "total_tokens": -1,
        "completion_tokens_details": {"reasoning_tokens": 4990},
    }
    async with usage_upstream(usage) as base:
        proxy = await start_proxy(priced_config(base))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        try:
            if stream:
                got = await client.chat.completions.create(
                    model="m", messages=USER, stream=True, stream_options={"include_usage": True}
                )
                shown = [c.usage async for c in got if c.usage is not None][-1]
            else:
                shown = (await client.chat.completions.create(model="m", messages=USER)).usage
        finally:
            await client.close()
    assert shown is not None and (shown.prompt_tokens, shown.completion_tokens, shown.total_tokens) == (10, 5000, 5010)

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (10, 5000)
