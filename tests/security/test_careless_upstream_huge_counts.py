"""Spend lost: an upstream whose usage reports more than 2,147,483,647 tokens, on a PostgreSQL ledger.

A count is accepted up to 2^40 (past it, it is garbage and the answer is counted from its
text), but the ledger's token columns were PostgreSQL's 32-bit `integer`: the insert failed
("integer out of range"), the batch was written again row by row and the request set aside,
out of the ledger and the request log. Its cost ($30,000 here) was then unknown to every
report and to the budgets read back at the next start. The columns are 64-bit now, and a
database an earlier release made is widened at start.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import psycopg
import pytest
from aiohttp import web

from edgeroute.cost.ledger_store import PostgresBackend
from tests.conftest import eventually
from tests.security.conftest import priced_config, titan_upstream, usage_upstream
from tests.test_cost_support import cost_proxy, require_postgres

HUGE = 3_000_000_000  # past 32 bits, within the 2^40 a count may be
COUNTS = {"spend": ("prompt_tokens", "completion_tokens", "cached_tokens"),
          "spend_attempts": ("prompt_tokens", "completion_tokens")}  # fmt: skip


@pytest.fixture
def old_ledger() -> Iterator[str]:
    """A PostgreSQL schema holding the ledger's tables as an earlier release made them (32-bit counts)."""
    dsn = require_postgres()
    schema = f"counts_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    target = f"{dsn}?options=-csearch_path%3D{schema}"
    PostgresBackend(target).close()
    with psycopg.connect(target, autocommit=True) as c:
        for table, cols in COUNTS.items():
            c.execute(f"ALTER TABLE {table} " + ", ".join(f"ALTER COLUMN {col} TYPE INTEGER" for col in cols))
    yield target
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with usage_upstream({"prompt_tokens": 5, "completion_tokens": HUGE}) as url:
        yield url


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_count_past_32_bits_is_kept_in_the_ledger_with_its_spend(
    old_ledger: str, upstream: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = priced_config(upstream)  # $10 per million output tokens: $30,000
    cfg["ledger"] = {"backend": "postgres", "dsn": old_ledger, "flush_interval": 0.1}
    with caplog.at_level(logging.WARNING, logger="edgeroute"):
        async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
            msgs: Any = [{"role": "user", "content": "hi"}]
            if stream:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", messages=msgs, stream=True, stream_options={"include_usage": True}
                )
                chunks = [c async for c in raw.parse()]
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello"
            else:
                raw = await client.chat.completions.with_raw_response.create(model="m", messages=msgs)
                assert raw.parse().choices[0].message.content == "hello"
            rid = raw.headers["x-request-id"]

            async def logged() -> dict[str, Any] | None:
                async with s.get(f"{proxy.url}/admin/requests/{rid}") as r:
                    return await r.json() if r.status == 200 else None

            record = await eventually(logged, "the request in the request log", within=10)
            await client.close()
    assert record["completion_tokens"] == HUGE and record["cost_usd"] == pytest.approx(30_000, rel=1e-6)
    with psycopg.connect(old_ledger) as c:
        spend = c.execute("SELECT completion_tokens, cost_usd FROM spend WHERE request_id = %s", (rid,)).fetchall()
        attempts = c.execute("SELECT completion_tokens FROM spend_attempts WHERE request_id = %s", (rid,)).fetchall()
    assert spend == [(HUGE, pytest.approx(30_000, rel=1e-6))]
    assert attempts == [(HUGE,)]
    assert not [r for r in caplog.records if "set aside" in r.getMessage() or "row by row" in r.getMessage()]


def test_a_ledger_made_by_an_earlier_release_is_widened_once(old_ledger: str) -> None:
    PostgresBackend(old_ledger).close()
    with psycopg.connect(old_ledger) as c:
        types = c.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND column_name LIKE '%%_tokens' AND table_name LIKE 'spend%%'"
        ).fetchall()
    assert sorted(types) == sorted((t, col, "bigint") for t, cols in COUNTS.items() for col in cols)


@pytest.mark.parametrize("count", [2**40, 10**15, 2**63 - 1], ids=["2^40", "10^15", "2^63-1"])
async def test_a_titan_count_past_the_bound_is_counted_from_the_text(serve: Any, count: int) -> None:
    """Titan's `inputTextTokenCount` was taken whatever its size: 10^15 tokens a text priced the
    request at two billion USD (past any budget), and two texts of 2^63-1 made a count past 64
    bits that no ledger could store (the record was set aside). From 2^40 on it is garbage,
    as any other usage count is: the texts are counted."""

    async def titan(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response({"embedding": [0.125, 0.5], "inputTextTokenCount": count})

    server, cfg = await titan_upstream(titan)
    proxy = await serve(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        got = await client.embeddings.create(model="embed", input=["hello there", "general kenobi"])
    finally:
        await client.close()
        await server.close()
    assert [d.embedding for d in got.data] == [[0.125, 0.5], [0.125, 0.5]]
    assert 2 <= got.usage.prompt_tokens < 20, got.usage  # the two texts, counted

    async def recorded() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(recorded, "the request's record")
    assert rec.usage.estimated and rec.usage.prompt_tokens == got.usage.prompt_tokens
    assert rec.cost_usd < 1e-4
