"""A Responses request that continues a stored conversation (`previous_response_id`) is billed
by the provider for the whole conversation (every earlier turn's input and output is read
again as input), and one naming a stored prompt (`prompt.id`) for the prompt's text kept at
the provider. Admission reserved only for the request's own text: ten concurrent
continuations of a 10,000-token conversation were each admitted on a few tokens, and spent
twice a team's budget; a key limited to 20,000 tokens a minute used 100,000. The size of a
conversation is now recorded with its id (its input and output tokens, from the answer's
usage: a JSON answer's before it is sent, a stream's at its end), and a continuation's
prompt counts it before the decision, so budgets and token limits reserve for it. An id
bound without a size (by an earlier release) and a stored prompt are taken to fill the
route's context window (a fixed allowance where none is configured): a budget that cannot
hold that refuses them."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import budget_spent, cost_proxy, statuses_of

ADMIN, APP, LIMITED = "sk-stored-admin", "sk-stored-app", "sk-stored-limited"
LIMIT = 0.05  # USD, at $1 a million input tokens: 50,000 tokens
WORDS = "lorem ipsum dolor sit amet " * 2000  # 10,000 words, a token each: $0.01 a reading
TPM = 20_000


class Provider:
    """Keeps each response's conversation, as OpenAI does (`store`), and bills a word a token of
    the input and of everything the continued conversation held; a stored prompt is 30,000 words."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.ids = itertools.count(1)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = len(orjson.dumps(body.get("input")).decode().split())
        prompt += self.sizes.get(body.get("previous_response_id") or "", 0)
        prompt += 30_000 if isinstance(body.get("prompt"), dict) else 0
        rid = f"resp_{next(self.ids)}"
        self.sizes[rid] = prompt + 1
        await asyncio.sleep(0.3)  # concurrent requests overlap
        text = {"type": "output_text", "text": "ok", "annotations": []}
        message = {"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed", "content": [text]}
        usage = {"input_tokens": prompt, "output_tokens": 1, "total_tokens": prompt + 1}
        out = {"id": rid, "object": "response", "created_at": 1, "model": "gpt-4o", "output": [message]}
        if not body.get("stream"):
            return web.json_response({**out, "status": "completed", "usage": usage})
        created = {"type": "response.created", "sequence_number": 0, "response": {**out, "status": "in_progress"}}
        done = {**out, "status": "completed", "usage": usage}
        return await stream_events(
            request, [created, {"type": "response.completed", "sequence_number": 1, "response": done}]
        )


async def stream_events(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    """`events` as a Responses stream, each with its `event:` line."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for ev in events:
        await resp.write(f"event: {ev['type']}\ndata: ".encode() + orjson.dumps(ev) + b"\n\n")
    await resp.write_eof()
    return resp


@pytest.fixture
async def provider() -> AsyncIterator[tuple[str, Provider]]:
    kept = Provider()
    async with routes_upstream(web.post("/v1/responses", kept.responses)) as server:
        yield server.url + "/v1", kept


def _config(upstream: str, tmp_path: Path, window: int = 0) -> dict[str, Any]:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 0}
    deployment = {"provider": "p", "model": "gpt-4o", "price": price, "context_window": window}
    return {
        "providers": {"p": {"kind": "openai", "base_url": upstream, "api_key": "key-p"}},
        "deployments": {"d": deployment},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {
            "app": {"token": APP, "team": "t"},
            "limited": {"token": LIMITED, "limits": {"tpm": TPM}},
            "ops": {"token": ADMIN, "role": "admin"},
        },
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": LIMIT, "period": "day"}]},
    }


async def _conversation(client: openai.AsyncOpenAI, stream: bool) -> str:
    """A 10,000-token conversation's id, made by a JSON or a streamed answer."""
    if not stream:
        return (await client.responses.create(model="m", input=WORDS, max_output_tokens=5)).id
    async with await client.responses.create(model="m", input=WORDS, max_output_tokens=5, stream=True) as events:
        done = [ev async for ev in events if ev.type == "response.completed"]
    return done[0].response.id


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_continuations_are_reserved_for_the_conversation(
    stream: bool, provider: tuple[str, Provider], tmp_path: Path
) -> None:
    async with cost_proxy(_config(provider[0], tmp_path)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            rid = await _conversation(client, stream)
            statuses = await statuses_of(
                lambda: client.responses.create(model="m", input="go on", previous_response_id=rid, max_output_tokens=5)
            )
        spent = await budget_spent(proxy.url, ADMIN)
    assert spent <= LIMIT + 1e-9, f"${spent} spent against a ${LIMIT} budget ({statuses})"
    assert 429 in statuses and 200 in statuses, statuses


async def test_continuations_are_counted_against_token_limits(provider: tuple[str, Provider], tmp_path: Path) -> None:
    async with cost_proxy(_config(provider[0], tmp_path)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=LIMITED, max_retries=0) as client:
            rid = (await client.responses.create(model="m", input=WORDS, max_output_tokens=5)).id
            statuses = await statuses_of(
                lambda: client.responses.create(model="m", input="go on", previous_response_id=rid, max_output_tokens=5)
            )
    # 10,000 tokens taken by the first, each continuation 10,000 more: the minute holds one.
    assert statuses.count(200) <= 1 and 429 in statuses, statuses


@pytest.mark.parametrize("window", [0, 40_000], ids=["no-window", "window"])
async def test_a_conversation_of_unknown_size_is_reserved_to_the_window(
    window: int, provider: tuple[str, Provider], tmp_path: Path
) -> None:
    """An id bound before sizes were recorded: its conversation fills the route's context window
    (or 128,000 tokens where none is configured), which the $0.05 budget cannot hold at once, nor twice."""
    cfg = _config(provider[0], tmp_path, window)
    cfg["budgets"]["limits"][0]["limit_usd"] = 0.07
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            rid = (await client.responses.create(model="m", input=WORDS, max_output_tokens=5)).id
            with sqlite3.connect(tmp_path / "l.db") as db:
                db.execute("UPDATE gov_response_owners SET tokens = NULL")
            statuses = await statuses_of(
                lambda: client.responses.create(
                    model="m", input="go on", previous_response_id=rid, max_output_tokens=5
                ),
                n=3,
            )
    # $0.01 spent; the allowance (40,000 or 128,000 tokens: $0.04, $0.128) fits once, or never.
    assert statuses == ([200, 429, 429] if window else [429, 429, 429]), statuses


async def test_a_stored_prompt_is_reserved_to_the_window(provider: tuple[str, Provider], tmp_path: Path) -> None:
    """The provider bills 30,000 tokens for the stored prompt: three concurrent requests would
    spend $0.09 against $0.05. Each reserves the 40,000-token window: one is admitted at a time."""
    async with cost_proxy(_config(provider[0], tmp_path, 40_000)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            statuses = await statuses_of(
                lambda: client.responses.create(model="m", input="hi", prompt={"id": "pmpt_1"}, max_output_tokens=5),
                n=3,
            )
        spent = await budget_spent(proxy.url, ADMIN)
    assert statuses == [200, 429, 429], (statuses, spent)
    assert spent <= LIMIT + 1e-9


def _old_table(ledger: dict[str, Any], tmp_path: Path) -> None:
    """The bindings' table as an earlier release made it (no sizes), with team t's `resp_old`."""
    create = "CREATE TABLE gov_response_owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL)"
    row = "INSERT INTO gov_response_owners VALUES ('resp_old', 'team:t', 1e10)"
    if ledger.get("backend") == "postgres":
        import psycopg

        with psycopg.connect(ledger["dsn"], autocommit=True) as db:
            db.execute(create)
            db.execute(row)
        return
    with sqlite3.connect(tmp_path / "l.db") as db:
        db.execute(create)
        db.execute(row)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_bindings_made_before_the_upgrade_reserve_the_window(
    backend: str, provider: tuple[str, Provider], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A ledger an earlier release used: its bindings have no size, and their conversations
    (10,000 tokens at the provider) reserve the 60,000-token window ($0.06: past the budget); a
    conversation made after the upgrade reserves its recorded size."""
    cfg = _config(provider[0], tmp_path, 60_000)
    if backend == "postgres":
        cfg["ledger"] = {"backend": "postgres", "dsn": request.getfixturevalue("pg_schema_dsn"), "flush_interval": 0.05}
    _old_table(cfg["ledger"], tmp_path)
    provider[1].sizes["resp_old"] = 10_001
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError):
                await client.responses.create(model="m", input="go on", previous_response_id="resp_old")
            rid = (await client.responses.create(model="m", input=WORDS, max_output_tokens=5)).id
            said = await client.responses.create(
                model="m", input="go on", previous_response_id=rid, max_output_tokens=5
            )
    assert said.status == "completed"


async def test_a_keyless_server_reserves_stored_state_to_the_window(
    provider: tuple[str, Provider], tmp_path: Path
) -> None:
    """Without virtual keys nothing is bound: a continuation, a stored prompt and a stored
    `conversation` each reserve the 60,000-token window ($0.06), which a $0.05 global budget
    cannot hold; a request naming none is served."""
    cfg = _config(provider[0], tmp_path, 60_000)
    del cfg["keys"]
    cfg["budgets"]["limits"][0] = {"name": "b", "scope": "global", "limit_usd": LIMIT, "period": "day"}
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
            rid = (await client.responses.create(model="m", input="hi", max_output_tokens=5)).id
            for named in ({"previous_response_id": rid}, {"prompt": {"id": "pmpt_1"}}, {"conversation": "conv_1"}):
                with pytest.raises(openai.RateLimitError):
                    await client.responses.create(model="m", input="go on", max_output_tokens=5, extra_body=named)
