"""An attempt edgeroute gives up waiting for is priced as one it cancels: the upstream had the
request and has likely billed its prompt (OpenAI bills a request whose client timed out). It
was priced at nothing, so a failover after a timeout, or a request whose every attempt timed
out, left that spend out of the ledger and of every budget. One that never left edgeroute
(waiting for a connection of its provider's pool) costs nothing: the upstream never saw it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute import _core
from tests.conftest import eventually
from tests.providers_fixtures import BEDROCK_OPTIONS, start_mock
from tests.test_cost_support import cost_proxy
from tests.test_endpoints_embeddings_bedrock import TITAN

__all__ = ["start_mock"]

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
PROMPT = [{"role": "user", "content": "tell me about the sea " * 20}]
BUDGET = {"limits": [{"name": "all", "scope": "global", "limit_usd": 100.0}]}


def _rows(db: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def _spent(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/budgets") as r:
        return float((await r.json())["budgets"][0]["spent_usd"])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_timed_out_attempt_is_priced_for_its_prompt_and_counted_in_budgets(
    start_upstream: Any, tmp_path: Path, stream: bool
) -> None:
    slow = await start_upstream(latency_ms=1500, record=True)
    fast = await start_upstream()
    db = tmp_path / "l.db"
    cfg = {
        "providers": {
            "slow": {"base_url": slow.base_url, "timeouts": {"first_byte": 0.3}},
            "fast": {"base_url": fast.base_url},
        },
        "deployments": {
            "d-slow": {"provider": "slow", "model": "gpt-4o", "weight": 1000, "price": PRICE},
            "d-fast": {"provider": "fast", "model": "gpt-4o", "weight": 1, "price": PRICE},
        },
        "models": {"m": {"deployments": ["d-slow", "d-fast"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": BUDGET,
    }
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
            if stream:
                async for _ in await client.chat.completions.create(model="m", messages=PROMPT, stream=True):
                    pass
            else:
                await client.chat.completions.create(model="m", messages=PROMPT)
        spent = await _spent(proxy.url)
    assert len(slow.options.requests) == 1  # the slow upstream had the request
    attempts = _rows(db, "SELECT deployment, outcome, prompt_tokens, completion_tokens, cost_usd FROM spend_attempts")
    by = {a[0]: a for a in attempts}
    timed_out = by["d-slow"]
    assert timed_out[1] == "timeout" and timed_out[2] > 50 and timed_out[3] == 0
    assert timed_out[4] == pytest.approx(timed_out[2] * 1.0 / 1e6)  # its prompt, at the input price
    (cost,) = _rows(db, "SELECT cost_usd FROM spend")[0]
    assert cost == pytest.approx(timed_out[4] + by["d-fast"][4])
    assert spent == pytest.approx(cost, abs=1e-8)  # the budget counts what the ledger records


async def test_a_request_whose_only_attempt_timed_out_is_priced_and_one_never_sent_is_not(
    start_upstream: Any, tmp_path: Path
) -> None:
    # One connection to provider p: a long stream holds it while a second request waits for it
    # in the pool and times out there, never sent; a third, to slow provider q, times out there.
    up = await start_upstream(chunk_interval=0.1, reply_words=30, record=True)
    slow = await start_upstream(latency_ms=1500, record=True)
    db = tmp_path / "l.db"
    timeouts = {"first_byte": 0.4}
    cfg = {
        "providers": {
            "p": {"base_url": up.base_url, "max_connections": 1, "timeouts": timeouts},
            "q": {"base_url": slow.base_url, "timeouts": timeouts},
        },
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o", "price": PRICE},
            "e": {"provider": "q", "model": "gpt-4o", "price": PRICE},
        },
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}, "s": {"deployments": ["e"], "max_attempts": 1}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": BUDGET,
    }
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:

            async def long_stream() -> None:
                async for _ in await client.chat.completions.create(model="m", messages=PROMPT, stream=True):
                    pass

            holder = asyncio.create_task(long_stream())

            async def holding() -> bool:
                return len(up.options.requests) == 1

            await eventually(holding, "the stream holding the one connection")
            with pytest.raises(openai.APIStatusError) as waited:
                await client.chat.completions.create(model="m", messages=PROMPT)
            with pytest.raises(openai.APITimeoutError):  # a client that leaves while it waits
                await client.chat.completions.create(model="m", messages=PROMPT, timeout=0.2)
            await holder
            with pytest.raises(openai.APIStatusError) as stalled:
                await client.chat.completions.create(model="s", messages=PROMPT)
        spent = await _spent(proxy.url)
    assert waited.value.status_code == stalled.value.status_code == 504
    assert len(up.options.requests) == 1 and len(slow.options.requests) == 1  # the waiting one never left
    rows = _rows(db, "SELECT request_id, outcome, cost_usd FROM spend ORDER BY id")
    attempts = {r: (o, c) for r, o, c in _rows(db, "SELECT request_id, outcome, cost_usd FROM spend_attempts")}
    by_id = {r[0]: r for r in rows}
    waited_id = waited.value.response.headers["x-request-id"]
    stalled_id = stalled.value.response.headers["x-request-id"]
    assert attempts[waited_id] == ("timeout", 0.0) and by_id[waited_id][2] == 0.0  # never sent: nothing billed
    (gone,) = [r for r in rows if r[1] == "client_gone"]
    assert attempts[gone[0]] == ("cancelled", 0.0) and gone[2] == 0.0
    assert attempts[stalled_id][0] == "timeout" and attempts[stalled_id][1] > 0  # sent: its prompt billed
    assert by_id[stalled_id][2] == pytest.approx(attempts[stalled_id][1])
    assert spent == pytest.approx(sum(r[2] for r in rows), abs=1e-8)


@pytest.mark.parametrize("ends", ["client_leaves", "upstream_times_out"])
async def test_a_titan_batch_given_up_on_is_priced_for_the_texts_sent(
    start_mock: Any, start_proxy: Any, ends: str
) -> None:
    """Titan embeds one text a call: a batch is sent 8 calls at a time. Each call given up on was
    priced at the whole batch's prompt, so a client that left mid-batch was charged eight
    times the batch (and a batch of 16 texts, four times what all 16 would have cost)."""
    up = await start_mock("bedrock", latency_ms=2000, record=True)
    timeouts = {"first_byte": 0.6} if ends == "upstream_times_out" else {}
    cfg = {
        "providers": {
            "aws": {"kind": "bedrock", "base_url": up.base_url, "options": BEDROCK_OPTIONS, "timeouts": timeouts}
        },
        "deployments": {
            "titan": {"provider": "aws", "model": TITAN, "encoding": "cl100k_base", "price": {"input_per_mtok": 1.0}}
        },
        "models": {"embed": {"deployments": ["titan"], "max_attempts": 1}},
    }
    proxy = await start_proxy(cfg)
    texts = [f"the {i}th text about the weather at sea" for i in range(16)]
    client_timeout = 0.6 if ends == "client_leaves" else 10.0
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        with pytest.raises((openai.APITimeoutError, openai.APIStatusError)):
            await client.embeddings.create(model="embed", input=texts, timeout=client_timeout)
    rec = await eventually(lambda: _recorded(proxy), "the request's record")
    sent = [r["body"]["inputText"] for r in up.options.requests]
    assert 0 < len(sent) < len(texts)
    # One attempt whose calls are merged (timed out), or one a call (cancelled with the client).
    tokens = sum(a.usage.prompt_tokens for a in rec.attempts if a.usage is not None)
    assert tokens == sum(_core.Router.count_tokens(t, "cl100k_base") for t in sent)
    assert rec.cost_usd == pytest.approx(tokens / 1e6)


async def _recorded(proxy: Any) -> Any:
    return proxy.recorder.records[-1] if proxy.recorder.records else None
