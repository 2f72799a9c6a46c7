"""Built-in tool calls are priced beside tokens: OpenAI's Responses `web_search_call` (and
file search, code interpreter) items and Anthropic's `usage.server_tool_use.web_search_requests`,
at the deployment's `price.tool_calls`, in `x-edgeroute-cost-usd` and the request's record."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.accounting import Usage, cost_of, responses_tool_calls
from edgeroute.config import Price, price_catalogue
from edgeroute.cost.tool_calls import anthropic_tools, responses_tools
from tests.conftest import eventually, routes_upstream
from tests.providers_fixtures import provider_config, start_mock
from tests.test_cost_support import budget_spent, cost_proxy, statuses_of

__all__ = ["start_mock"]

TOKENS = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
SEARCH = 0.025  # USD a call, as configured (not a list price)


def _cfg(up: Any, tool_calls: dict[str, float] | None, header: tuple[str, str]) -> dict[str, Any]:
    cfg = provider_config({"u": up}, models={"u": "claude-x" if up.kind == "anthropic" else "gpt-4o"})
    cfg["providers"]["u"]["headers"] = dict([header])  # what the mock answers
    cfg["deployments"]["d-u"]["price"] = {**TOKENS, **({"tool_calls": tool_calls} if tool_calls else {})}
    return cfg


async def _record(proxy: Any) -> Any:
    async def recorded() -> list[Any]:
        return list(proxy.recorder.records)

    (rec,) = await eventually(recorded, "the request's record")
    return rec


def _tokens_cost(usage: Usage) -> float:
    return cost_of(Price(**TOKENS), Usage(usage.prompt_tokens, usage.completion_tokens))


@pytest.mark.parametrize("stream", [False, True])
async def test_web_search_calls_of_a_response_are_priced(start_mock: Any, start_proxy: Any, stream: bool) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(_cfg(up, {"web_search": SEARCH}, ("x-mock-tool-calls", "web_search=2")))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    tools: Any = [{"type": "web_search"}]
    if stream:
        kinds = [
            ev.type async for ev in await client.responses.create(model="m", input="news?", tools=tools, stream=True)
        ]
        assert kinds[-1] == "response.completed"
    else:
        raw = await client.responses.with_raw_response.create(model="m", input="news?", tools=tools)
        assert [o.type for o in raw.parse().output].count("web_search_call") == 2
    rec = await _record(proxy)
    assert rec.usage.tool_calls == {"web_search": 2}
    assert rec.cost_usd == pytest.approx(_tokens_cost(rec.usage) + 2 * SEARCH)
    if not stream:
        assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(rec.cost_usd)


@pytest.mark.parametrize("stream", [False, True])
async def test_image_generation_calls_of_a_response_are_priced(start_mock: Any, start_proxy: Any, stream: bool) -> None:
    """OpenAI bills its Responses `image_generation` tool per image, apart from the response's
    usage: its `image_generation_call` items could not be priced, so a tenant drew images past
    every budget, recorded at the text's cost alone."""
    image = 0.17  # USD an image, as configured (not a list price)
    up = await start_mock("openai")
    cfg = _cfg(up, {"image_generation": image}, ("x-mock-tool-calls", "image_generation=2"))
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    tools: Any = [{"type": "image_generation", "quality": "high"}]
    if stream:
        events = [ev async for ev in await client.responses.create(model="m", input="a cat", tools=tools, stream=True)]
        assert events[-1].type == "response.completed"
        output = events[-1].response.output  # type: ignore[union-attr]
    else:
        output = (await client.responses.create(model="m", input="a cat", tools=tools)).output
    assert [o.type for o in output].count("image_generation_call") == 2
    rec = await _record(proxy)
    assert rec.usage.tool_calls == {"image_generation": 2}
    assert rec.cost_usd == pytest.approx(_tokens_cost(rec.usage) + 2 * image)
    assert responses_tools(tools) == (("image_generation", 0, 1),)  # reserved for: one call, by default


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_web_search_requests_are_priced(start_mock: Any, start_proxy: Any, stream: bool) -> None:
    up = await start_mock("anthropic")
    proxy = await start_proxy(_cfg(up, {"web_search": SEARCH}, ("x-mock-web-searches", "3")))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    msgs: Any = [{"role": "user", "content": "news?"}]
    tools: Any = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    if stream:
        async with client.messages.stream(model="m", max_tokens=100, messages=msgs, tools=tools) as s:
            final = await s.get_final_message()
        assert final.usage.server_tool_use is not None and final.usage.server_tool_use.web_search_requests == 3
    else:
        raw = await client.messages.with_raw_response.create(model="m", max_tokens=100, messages=msgs, tools=tools)
        used = (await raw.parse()).usage.server_tool_use
        assert used is not None and used.web_search_requests == 3
    rec = await _record(proxy)
    assert rec.usage.tool_calls == {"web_search": 3}
    assert rec.cost_usd == pytest.approx(_tokens_cost(rec.usage) + 3 * SEARCH)
    if not stream:
        assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(rec.cost_usd)


async def test_without_a_tool_price_the_calls_cost_nothing(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(_cfg(up, None, ("x-mock-tool-calls", "web_search=2")))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.responses.with_raw_response.create(model="m", input="news?", tools=[{"type": "web_search"}])
    rec = await _record(proxy)
    assert rec.cost_usd > 0 and rec.cost_usd == pytest.approx(_tokens_cost(rec.usage))
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(rec.cost_usd)


def test_a_code_interpreter_is_counted_by_its_container() -> None:
    calls = [
        {"type": "code_interpreter_call", "container_id": "c1"},
        {"type": "code_interpreter_call", "container_id": "c1"},
        {"type": "code_interpreter_call", "container_id": "c2"},
        {"type": "file_search_call"},
        {"type": "message"},
    ]
    assert responses_tool_calls(calls) == {"code_interpreter": 2, "file_search": 1}


def test_a_tool_price_is_checked_like_any_price() -> None:
    with pytest.raises(ValueError):
        Price(tool_calls={"web_search": -1})
    with pytest.raises(ValueError):
        Price(tool_calls={"telepathy": 0.1})


ADMIN, APP = "sk-tools-admin", "sk-tools-app"


def _budgeted(up: Any, header: tuple[str, str], limit_usd: float, tmp_path: Path, **budgets: Any) -> dict[str, Any]:
    """A web search at $1 a call (tokens free) under team t's budget of `limit_usd` a day."""
    cfg = _cfg(up, {"web_search": 1.0}, header)
    cfg["deployments"]["d-u"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 0, "tool_calls": {"web_search": 1.0}}
    limit = {"name": "b", "scope": "team", "match": "t", "limit_usd": limit_usd, "period": "day"}
    return cfg | {
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [limit], **budgets},
    }


async def test_concurrent_web_searches_do_not_overshoot_a_budget(start_mock: Any, tmp_path: Path) -> None:
    # Tokens are free: before tool calls were reserved for, the three requests reserved nothing.
    up = await start_mock("openai", latency_ms=300)
    async with cost_proxy(_budgeted(up, ("x-mock-tool-calls", "web_search=1"), 1.5, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        tools: Any = [{"type": "web_search"}]
        statuses = await statuses_of(lambda: client.responses.create(model="m", input="news?", tools=tools), 3)
        await client.close()
        total = await eventually(lambda: budget_spent(proxy.url, ADMIN), "the search's spend in the budget")
    assert statuses == [200, 429, 429]
    assert total == pytest.approx(1.0)  # the one search the answer reported, settled
    conn = sqlite3.connect(tmp_path / "l.db")
    try:
        rows = conn.execute("SELECT outcome, cost_usd FROM spend").fetchall()
    finally:
        conn.close()
    assert sorted(rows) == [("blocked", 0.0), ("blocked", 0.0), ("ok", pytest.approx(1.0))]


def test_the_tools_a_request_enables_are_named_by_their_priced_kind() -> None:
    tools = [{"type": "web_search_preview"}, {"type": "function", "name": "f"}, {"type": "file_search"}]
    # (kind, calls its bounds allow, its tools without a bound: `reserve_tool_calls` each)
    assert responses_tools(tools) == (("web_search", 0, 1), ("file_search", 0, 1))
    assert responses_tools(tools, 4) == (("web_search", 4, 0), ("file_search", 4, 0))
    server = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}, {"name": "f"}]
    assert anthropic_tools(server) == (("web_search", 5, 0),)
    assert anthropic_tools([{"type": "web_fetch_20250910", "max_uses": "5"}]) == (("web_fetch", 0, 1),)
    # Two versions of a tool, each with its own bound (or none): either may run its whole bound.
    both = [{"type": "web_search_20250305", "max_uses": 5}, {"type": "web_search_20260209", "max_uses": 2}]
    assert anthropic_tools(both) == (("web_search", 7, 0),)
    assert anthropic_tools([*both, {"type": "web_search_20250305"}]) == (("web_search", 7, 1),)
    assert responses_tools("web_search") == ()


@pytest.mark.parametrize(
    ("kind", "bounded"), [("openai", True), ("anthropic", True), ("openai", False), ("anthropic", False)]
)
async def test_a_bound_on_tool_calls_is_reserved_whole(
    start_mock: Any, tmp_path: Path, kind: str, bounded: bool
) -> None:
    """A request that allows three searches (`max_tool_calls`, `max_uses`; or sets no bound,
    under `budgets.reserve_tool_calls: 3`) and makes them: one was reserved, three were
    billed, so three such requests at once spent $9 of a $3.50 budget."""
    up = await start_mock(kind, latency_ms=300)
    header = ("x-mock-tool-calls", "web_search=3") if kind == "openai" else ("x-mock-web-searches", "3")
    reserve = {} if bounded else {"reserve_tool_calls": 3}
    async with cost_proxy(_budgeted(up, header, 3.5, tmp_path, **reserve)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        ac = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=APP, max_retries=0)
        tools: Any = [{"type": "web_search"}]
        server: Any = [{"type": "web_search_20250305", "name": "web_search", **({"max_uses": 3} if bounded else {})}]
        msgs: Any = [{"role": "user", "content": "news?"}]
        bound: Any = {"max_tool_calls": 3} if bounded else {}

        async def ask() -> Any:
            if kind == "openai":
                return await client.responses.create(model="m", input="news?", tools=tools, **bound)
            return await ac.messages.create(model="m", max_tokens=100, messages=msgs, tools=server)

        statuses = await statuses_of(ask, 3)
        total = await eventually(lambda: budget_spent(proxy.url, ADMIN), "the searches' spend in the budget")
        with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)) as refused:
            await ask()  # $0.50 left: the refusal names what the request reserves
        await client.close()
        await ac.close()
    assert statuses == [200, 429, 429]
    assert total == pytest.approx(3.0)  # the three searches the answer reported, settled
    assert "3 web_search calls" in refused.value.message, refused.value.message


def _sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


async def _cut(request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
    """`events`, then the connection closed: no terminal event, no final usage."""
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    await out.write(b"".join(map(_sse, events)))
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return out


async def _responses_cut(request: web.Request) -> web.StreamResponse:
    """Two searches done, a message begun, then a third search begun (it runs upstream, and is
    billed) when the connection closes before its item is done."""
    searches = [
        {"type": f"response.output_item.{step}", "sequence_number": 1 + 2 * i + (step == "done"), "output_index": i,
         "item": {"type": "web_search_call", "id": f"ws_{i}", "status": status, "action": {"type": "search"}}}
        for i in range(2)
        for step, status in (("added", "in_progress"), ("done", "completed"))
    ]  # fmt: skip
    delta = {"type": "response.output_text.delta", "sequence_number": 5, "item_id": "msg_x", "output_index": 2}
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_x", "status": "in_progress"}}
    third = {**searches[0], "sequence_number": 6, "output_index": 3}
    third["item"] = {**searches[0]["item"], "id": "ws_3"}
    text = {**delta, "content_index": 0, "delta": "word ", "logprobs": []}
    return await _cut(request, [created, *searches, text, third])


async def _messages_cut(request: web.Request) -> web.StreamResponse:
    usage = {"input_tokens": 20, "output_tokens": 1}
    message = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "usage": usage,
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    for i in range(3):
        use = {"type": "server_tool_use", "id": f"srvtoolu_{i}", "name": "web_search", "input": {}}
        events += [
            {"type": "content_block_start", "index": 2 * i, "content_block": use},
            {"type": "content_block_stop", "index": 2 * i},
            {"type": "content_block_start", "index": 2 * i + 1,
             "content_block": {"type": "web_search_tool_result", "tool_use_id": use["id"], "content": []}},
            {"type": "content_block_stop", "index": 2 * i + 1},
        ]  # fmt: skip
    text = {"type": "content_block_start", "index": 6, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 6, "delta": {"type": "text_delta", "text": "word "}}
    return await _cut(request, [*events, text, delta])


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_tool_calls_of_a_stream_cut_before_its_usage_are_priced(start_proxy: Any, kind: str) -> None:
    async with routes_upstream(
        web.post("/v1/responses", _responses_cut), web.post("/v1/messages", _messages_cut)
    ) as server:
        base = server.url + ("/v1" if kind == "openai" else "")
        proxy = await start_proxy(
            {
                "providers": {"p": {"kind": kind, "base_url": base, "api_key": "key-p"}},
                "deployments": {"d": {"provider": "p", "model": "x", "price": {"tool_calls": {"web_search": SEARCH}}}},
                "models": {"m": {"deployments": ["d"]}},
            }
        )
        if kind == "openai":
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
            tools: Any = [{"type": "web_search"}]
            async for _ in await client.responses.create(model="m", input="news?", tools=tools, stream=True):
                pass
        else:
            ac = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
            server_tool: Any = [{"type": "web_search_20250305", "name": "web_search"}]
            msgs: Any = [{"role": "user", "content": "news?"}]
            with pytest.raises(anthropic.APIError):
                async with ac.messages.stream(model="m", max_tokens=100, messages=msgs, tools=server_tool) as s:
                    async for _ in s:
                        pass
        rec = await _record(proxy)
    searches = 3  # OpenAI: two done and one begun; Anthropic: three `server_tool_use` blocks
    assert rec.usage.tool_calls == {"web_search": searches}
    assert rec.cost_usd == pytest.approx(searches * SEARCH)  # tokens are free here


async def test_anthropic_server_tools_are_refused_by_other_providers(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(_cfg(up, {"web_search": SEARCH}, ("x-mock-web-searches", "1")))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    tools: Any = [{"type": "web_search_20250305", "name": "web_search"}]
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}], tools=tools
        )
    assert "tools" in e.value.message and not up.options.requests


def test_a_catalogue_entry_may_price_tool_calls() -> None:
    entry = {"provider": "openai", "input": 1.0, "output": 2.0, "as_of": "2026-12-05", "source": "test"}
    good = {"models": {"x": {**entry, "tool_calls": {"web_search": 0.01}}}}
    assert price_catalogue.check(good, "t")["models"]["x"]["tool_calls"] == {"web_search": 0.01}
    with pytest.raises(price_catalogue.CatalogueError, match=r"tool_calls\.telepathy: unknown tool"):
        price_catalogue.check({"models": {"x": {**entry, "tool_calls": {"telepathy": 1}}}}, "t")
    with pytest.raises(price_catalogue.CatalogueError, match=r"tool_calls\.web_search: must be a finite"):
        price_catalogue.check({"models": {"x": {**entry, "tool_calls": {"web_search": -1}}}}, "t")


def test_a_catalogue_update_names_a_changed_tool_price() -> None:
    entry = {"provider": "openai", "input": 1.0, "output": 2.0, "as_of": "2026-12-05", "source": "test"}
    old = {"models": {"x": {**entry, "tool_calls": {"web_search": 0.01}}}}
    new = {"models": {"x": {**entry, "tool_calls": {"web_search": 0.02, "file_search": 0.0025}}}}
    assert price_catalogue.diff(old, new).changed == [
        ("x", ["tool_calls.file_search - → 0.0025", "tool_calls.web_search 0.01 → 0.02"])
    ]
