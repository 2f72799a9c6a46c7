"""Spend invented: an Anthropic upstream whose `usage.server_tool_use` count is garbage.

A JSON answer's `web_search_requests` was taken as written, however large: a careless
upstream (a gateway, a self-hosted mock left in front of production) reporting 3,000,000,000
searches for an answer that ran two booked $30,000,000 at $0.01 a search, in the ledger, the
spend reports and every budget the request counted in, so a global monthly budget refused
every tenant until the month ended. The same count in a stream was dropped (the chat-shaped
usage's bound), pricing the searches the answer did run at nothing. A count past what one
answer can run (2^20) is now garbage on both paths, and the calls are counted from the
answer's own `server_tool_use` blocks, as a stream cut before its usage is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.test_cost_support import cost_proxy

SEARCH = 0.01  # USD a search, as configured
SEARCHES = 2  # the server_tool_use blocks each answer shows
TOKENS = 10 * 1 / 1e6 + 5 * 2 / 1e6  # 10 input tokens at $1/Mtok, 5 output at $2/Mtok
TOOLS: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]


def _content() -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for i in range(SEARCHES):
        blocks.append({"type": "server_tool_use", "id": f"srvtoolu_{i}", "name": "web_search", "input": {"query": "q"}})
        result = {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_{i}", "content": []}
        blocks.append(result)
    return [*blocks, {"type": "text", "text": "found it"}]


def _events(count: Any) -> list[bytes]:
    start = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1},
    }  # fmt: skip
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for i, block in enumerate(_content()):
        out.append({"type": "content_block_start", "index": i, "content_block": block})
        out.append({"type": "content_block_stop", "index": i})
    usage = {"output_tokens": 5, "server_tool_use": {"web_search_requests": count}}
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    out += [{"type": "message_delta", "delta": delta, "usage": usage}, {"type": "message_stop"}]
    return [f"event: {e['type']}\ndata: ".encode() + orjson.dumps(e) + b"\n\n" for e in out]


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """Anthropic's Messages API, reporting as many web searches as the prompt says (JSON),
    whatever it ran."""

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        count = orjson.loads(body["messages"][0]["content"])
        if not body.get("stream"):
            usage = {"input_tokens": 10, "output_tokens": 5, "server_tool_use": {"web_search_requests": count}}
            msg = {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": _content(),
                "stop_reason": "end_turn", "stop_sequence": None, "usage": usage,
            }  # fmt: skip
            return web.Response(body=orjson.dumps(msg), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in _events(count):
            await resp.write(event)
        await resp.write_eof()
        return resp

    async with routes_upstream(web.post("/v1/messages", messages)) as server:
        yield server.url


def _config(base_url: str, ledger: Path) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 2, "tool_calls": {"web_search": SEARCH}}
    return {
        "providers": {"p": {"kind": "anthropic", "base_url": base_url, "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "claude-x", "price": price}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"path": str(ledger), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "month", "scope": "global", "limit_usd": 100}]},
    }


def _spend(ledger: Path) -> list[float]:
    """Each request's cost in the ledger (flushed: the proxy has closed)."""
    with sqlite3.connect(ledger) as db:
        return [row[0] for row in db.execute("SELECT cost_usd FROM spend")]


async def _ask(client: anthropic.AsyncAnthropic, count: Any, stream: bool) -> None:
    msgs: Any = [{"role": "user", "content": orjson.dumps(count).decode()}]
    if stream:
        async with client.messages.stream(model="m", max_tokens=100, messages=msgs, tools=TOOLS) as s:
            final = await s.get_final_message()
    else:
        final = await client.messages.create(model="m", max_tokens=100, messages=msgs, tools=TOOLS)
    assert final.content[-1].type == "text"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    "count", [3_000_000_000, -2, "2", 2.0, None], ids=["huge", "negative", "string", "float", "null"]
)
async def test_a_garbage_tool_call_count_is_counted_from_the_answer(
    upstream: str, tmp_path: Path, count: Any, stream: bool
) -> None:
    ledger = tmp_path / "ledger.db"
    async with cost_proxy(_config(upstream, ledger)) as proxy:
        client = anthropic.AsyncAnthropic(base_url=str(proxy.server.make_url("")), api_key="x", max_retries=0)
        await _ask(client, count, stream)
        await _ask(client, count, stream)  # the budget still has room: $100 against two answers

    assert _spend(ledger) == pytest.approx([TOKENS + SEARCHES * SEARCH] * 2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_plausible_tool_call_count_is_billed_as_reported(upstream: str, tmp_path: Path, stream: bool) -> None:
    """The upstream's own count stands where it is an integer an answer can run (its bill)."""
    ledger = tmp_path / "ledger.db"
    async with cost_proxy(_config(upstream, ledger)) as proxy:
        client = anthropic.AsyncAnthropic(base_url=str(proxy.server.make_url("")), api_key="x", max_retries=0)
        await _ask(client, 3, stream)

    assert _spend(ledger) == pytest.approx([TOKENS + 3 * SEARCH])
