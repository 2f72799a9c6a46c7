"""A careless upstream's non-streamed answer past the size bound (`attempt.MAX_ANSWER_BYTES`):
the proxy holds no more than the bound of it, asks that deployment once (it would send the
same again, and be paid), fails over, and prices the cut answer at what the request could
have produced, not at four bytes a token of whatever arrived ($268 for one 502)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute.dispatch import attempt
from tests.security.conftest import chat_upstream
from tests.security.test_careless_upstream_big_answer import _answer

MIB = 1 << 20
BOUND_MIB = 8


# A chat answer of 40 MiB of content, sent in pieces, without usage (as a looping server's).
_huge = _answer(5 * BOUND_MIB, usage=False)


async def _fine(request: web.Request) -> web.StreamResponse:
    await request.read()
    choice = {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    return web.json_response(
        {"id": "y", "object": "chat.completion", "created": 1, "model": "x", "choices": [choice], "usage": usage}
    )


def _config(huge_port: int, fine_port: int | None) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2}
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{huge_port}/v1"}},
        "deployments": {"big": {"provider": "p", "model": "x", "price": price}},
        "models": {"m": {"deployments": ["big"], "max_attempts": 4}},
        "budgets": {"reserve_max_tokens": 1000},
    }
    if fine_port is not None:
        cfg["providers"]["q"] = {"base_url": f"http://127.0.0.1:{fine_port}/v1"}
        cfg["deployments"]["ok"] = {"provider": "q", "model": "x", "price": price}
        cfg["models"]["m"]["fallbacks"] = ["m2"]
        cfg["models"]["m2"] = {"deployments": ["ok"]}
    return cfg


async def test_an_oversized_answer_is_asked_once_held_once_and_priced_within_the_reservation(
    serve: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt, "MAX_ANSWER_BYTES", BOUND_MIB * MIB)
    up = await chat_upstream(_huge)
    proxy = await serve(_config(up.port, None))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    tracemalloc.start()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.close()
        await up.close()
    assert err.value.status_code == 502 and f"larger than {BOUND_MIB} MiB" in str(err.value.body)
    # The pieces up to the bound, once: not joined, sliced and kept on each attempt's failure
    # (three copies of 128 MiB at once, and one more for each of four attempts).
    assert peak < 1.6 * BOUND_MIB * MIB, f"peak {peak / MIB:.0f} MiB for a {BOUND_MIB} MiB bound"
    rec = proxy.recorder.records[-1]
    # Asked once: the same deployment would send the same again, paid.
    assert [a.deployment for a in rec.attempts] == ["big"]
    # Priced at the most the request could have produced (no max_tokens: what budgets reserve
    # for it), not 2 M tokens of 4-byte guesses.
    (a,) = rec.attempts
    assert a.usage is not None and a.usage.estimated and a.usage.completion_tokens == 1000
    assert a.cost_usd == pytest.approx((a.usage.prompt_tokens * 1 + 1000 * 2) / 1e6)


async def test_an_oversized_answer_fails_over(
    serve: Callable[..., Awaitable[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attempt, "MAX_ANSWER_BYTES", BOUND_MIB * MIB)
    up, fine = await chat_upstream(_huge), await chat_upstream(_fine)
    proxy = await serve(_config(up.port, fine.port))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
        await up.close()
        await fine.close()
    assert got.choices[0].message.content == "fine"
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["big", "ok"]
    big = rec.attempts[0]
    assert big.usage is not None and big.usage.completion_tokens == 1000  # what budgets reserve for it
