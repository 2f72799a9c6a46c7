"""`/v1/responses` end to end through the official openai SDK: passed through to an upstream
that speaks Responses, translated through chat for one that does not, failover between them."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.responses import Response

from edgeroute.mock.openai import MockOptions
from tests.conftest import Upstream, start_routes
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _config(ups: dict[str, tuple[Upstream, str]]) -> dict[str, Any]:
    """One provider per upstream with the given kind; model `m` over them in order (weights favour the first)."""
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": {"m": {"deployments": []}}}
    for i, (name, (up, kind)) in enumerate(ups.items()):
        cfg["providers"][name] = {"kind": kind, "base_url": up.base_url, "api_key": f"key-{name}-secret"}
        cfg["deployments"][f"d-{name}"] = {
            "provider": name,
            "model": "gpt-4o-mini",
            "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            "weight": 1000 if i == 0 else 1,
        }
        cfg["models"]["m"]["deployments"].append(f"d-{name}")
    return cfg


async def _events(url: str, body: dict[str, Any], key: str = "x") -> list[bytes]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = await resp.read()
    return [e for e in raw.split(b"\n\n") if e.strip()]


async def test_mock_matches_the_sdk_types(start_upstream) -> None:
    up = await start_upstream()
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="x")
    r = await client.responses.create(model="gpt-4o-mini", input="Say hi")
    assert isinstance(r, Response) and r.output_text.endswith("Say hi")
    kinds = [ev.type async for ev in await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


async def test_passed_through_to_an_upstream_that_speaks_responses(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, api_key="key-a-secret")
    proxy = await start_proxy(_config({"a": (up, "openai")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client")
    raw = await client.responses.with_raw_response.create(model="m", input="Tell me", instructions="Be brief")
    r = raw.parse()
    assert r.output_text == "Completion from the mock. You said: Tell me" and r.usage is not None
    assert raw.headers["x-edgeroute-deployment"] == "d-a"
    seen = up.options.requests[-1]
    assert seen["path"] == "/v1/responses" and seen["body"]["model"] == "gpt-4o-mini"
    assert seen["body"]["instructions"] == "Be brief"
    rec = proxy.recorder.records[-1]
    cost = (r.usage.input_tokens * 1.0 + r.usage.output_tokens * 2.0) / 1e6
    assert rec.cost_usd == pytest.approx(cost) and float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(cost)

    # The stream's events arrive exactly as the upstream sent them, and nothing else.
    stream_body = {"model": "gpt-4o-mini", "input": "Tell me", "stream": True}
    direct = await _events(up.base_url + "/responses", stream_body, "key-a-secret")
    relayed = await _events(proxy.url + "/v1/responses", {"model": "m", "input": "Tell me", "stream": True})

    def strip_volatile(ev: bytes) -> bytes:  # ids and times differ between two calls
        import re

        return re.sub(rb'"(id|item_id|created_at)":("[^"]*"|\d+)', b"", ev)

    assert [strip_volatile(e) for e in relayed] == [strip_volatile(e) for e in direct]
    assert b"[DONE]" not in b"".join(relayed)
    rec = proxy.recorder.records[-1]
    assert rec.stream and rec.status == 200 and rec.usage is not None and rec.usage.completion_tokens == 8


async def test_translated_through_chat(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"c": (up, "openai_compatible")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client")
    r = await client.responses.create(
        model="m",
        instructions="Be brief",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello"}]}],
        max_output_tokens=50,
    )
    assert r.status == "completed" and r.output_text.startswith("Hello from gpt-4o-mini")
    assert r.usage is not None and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    seen = up.options.requests[-1]["body"]
    assert seen["messages"][0] == {"role": "system", "content": "Be brief"}
    assert seen["max_tokens"] == 50 and "input" not in seen

    stream = await client.responses.create(model="m", input="Say hello", stream=True)
    events = [ev async for ev in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and text.startswith("Hello from gpt-4o-mini")
    assert final.usage is not None and final.usage.output_tokens > 0
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.completion_tokens == final.usage.output_tokens and rec.cost_usd > 0

    # A cut answer is an incomplete response.
    short = await client.responses.create(model="m", input="Say hello", max_output_tokens=2)
    assert short.status == "incomplete" and short.incomplete_details is not None


async def test_function_calls_through_chat(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"c": (up, "openai_compatible")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client")
    r = await client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER_TOOL])
    call = r.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"city":"Paris"}'
    assert up.options.requests[-1]["body"]["tools"][0]["function"]["name"] == "get_weather"
    # The tool's result goes back as input items; the model then answers in text.
    follow = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    r2 = await client.responses.create(model="m", input=follow, tools=[WEATHER_TOOL])
    assert r2.output_text
    msgs = up.options.requests[-1]["body"]["messages"]
    assert msgs[1]["tool_calls"][0]["id"] == call.call_id and msgs[2] == {
        "role": "tool",
        "tool_call_id": call.call_id,
        "content": "sunny",
    }
    stream = await client.responses.create(model="m", input="Weather?", tools=[WEATHER_TOOL], stream=True)
    events = [ev async for ev in stream]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done and done[0].arguments == '{"city":"Paris"}'
    assert events[-1].response.output[0].type == "function_call"


async def test_anthropic_deployment_through_chat(start_mock, start_proxy) -> None:
    ant = await start_mock("anthropic")
    proxy = await start_proxy(provider_config({"c": ant}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client")
    r = await client.responses.create(model="m", input="Say hello")
    assert r.output_text and r.usage is not None and r.usage.input_tokens > 0
    events = [ev async for ev in await client.responses.create(model="m", input="Say hello", stream=True)]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == r.output_text


async def test_failover_from_a_responses_upstream_to_a_chat_one(start_upstream, start_proxy) -> None:
    bad = await start_upstream(fail_status=503)
    good = await start_upstream(record=True)
    proxy = await start_proxy(_config({"a": (bad, "openai"), "b": (good, "openai_compatible")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0)
    raw = await client.responses.with_raw_response.create(model="m", input="Say hello", stream=True)
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    events = [ev async for ev in raw.parse()]
    assert events[-1].type == "response.completed"
    assert "messages" in good.options.requests[-1]["body"]  # the chat deployment got the translation
    assert len(proxy.recorder.records[-1].attempts) >= 2


async def test_what_chat_cannot_carry_is_a_400_naming_the_deployment(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"c": (up, "openai_compatible")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="m", input="x", tools=[{"type": "web_search"}])
    assert "`d-c`" in e.value.message and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="m", input="x", previous_response_id="resp_1")
    assert "previous_response_id" in e.value.message
    assert up.options.requests == []


async def test_what_chat_cannot_carry_goes_to_the_routes_responses_deployment(start_upstream, start_proxy) -> None:
    """A built-in tool on a route [chat deployment, OpenAI deployment]: the chat one was chosen
    and answered 400, never going on to the OpenAI one; it is now skipped before any call."""
    chat, native = await start_upstream(record=True), await start_upstream(record=True)
    proxy = await start_proxy(_config({"c": (chat, "openai_compatible"), "a": (native, "openai")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0)
    raw = await client.responses.with_raw_response.create(model="m", input="Find it", tools=[{"type": "web_search"}])
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and raw.parse().output_text
    assert "skipped d-c: cannot read the request" in raw.headers["x-edgeroute-explain"]
    assert chat.options.requests == [] and native.options.requests[-1]["body"]["tools"] == [{"type": "web_search"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": "x", "stream": 1}, "stream"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x"}, "model"),
    ],
)
async def test_bad_input(start_upstream, start_proxy, body, param) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"a": (up, "openai")}))
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/responses", json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert up.options.requests == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": {"role": "user", "content": "x"}}, "input"),
        ({"tools": 5}, "tools"),
        ({"instructions": ["be brief"]}, "instructions"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"store": "yes"}, "store"),
        ({"include": [1]}, "include"),
        ({"metadata": "x"}, "metadata"),
        ({"max_tool_calls": 1.5}, "max_tool_calls"),
    ],
)
async def test_a_parameter_of_the_wrong_type_is_a_400_naming_it_before_any_upstream(
    start_upstream, start_proxy, extra, param
) -> None:
    """Through the SDK, with a Responses upstream (which would get the body as written): the
    wrong type is edgeroute's own 400 in OpenAI's words, and no upstream is called."""
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"a": (up, "openai")}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model="m", input="x", extra_body=extra)
    assert e.value.code == "invalid_type" and e.value.param == param
    assert f"'{param}'" in e.value.message
    assert up.options.requests == []
    fine = await client.responses.create(model="m", input="x", temperature=1, include=["message.output_text.logprobs"])
    assert fine.output_text and len(up.options.requests) == 1


async def _broken_upstream(kind: str) -> TestServer:
    """An upstream whose stream breaks after its first content."""

    async def handler(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        if kind == "openai":
            created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_x"}}
            delta = {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m", "output_index": 0,
                     "content_index": 0, "delta": "Hel", "logprobs": []}  # fmt: skip
            await out.write(b"data: " + orjson.dumps(created) + b"\n\n" + b"data: " + orjson.dumps(delta) + b"\n\n")
        else:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                     "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}  # fmt: skip
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # mid-stream: no terminal event
        return out

    return await start_routes(web.post("/v1/responses", handler), web.post("/v1/chat/completions", handler))


@pytest.mark.parametrize("kind", ["openai", "openai_compatible"])
async def test_a_stream_cut_mid_way_ends_with_an_error_event(start_proxy, kind) -> None:
    server = await _broken_upstream(kind)
    try:
        up = Upstream(server, MockOptions())
        proxy = await start_proxy(_config({"a": (up, kind)}))
        events = await _events(proxy.url + "/v1/responses", {"model": "m", "input": "x", "stream": True})
        last = orjson.loads(events[-1].split(b"data: ", 1)[1])
        assert last["type"] == "error" and last["code"] in ("stream_incomplete", "stream_interrupted")
        assert b"[DONE]" not in b"".join(events)
        kinds = [orjson.loads(e.split(b"data: ", 1)[1])["type"] for e in events]
        assert "response.output_text.delta" in kinds and "response.completed" not in kinds
        rec = proxy.recorder.records[-1]
        assert rec.outcome == "stream_interrupted" and rec.error_class == last["code"]
        assert rec.usage is not None  # what was produced is still costed
    finally:
        await server.close()


async def test_a_budgets_downgrade_keeps_what_only_responses_can_serve_on_its_model(start_upstream, tmp_path) -> None:
    """A request without a chat translation (a built-in tool) is served only by a deployment that
    speaks Responses: a budget's downgrade to a model with only chat deployments left it on its
    model, not a 400 ("cannot be served by a chat deployment") past the threshold; a request
    chat can carry is downgraded as before."""
    from tests.test_cost_support import cost_proxy

    native, chat = await start_upstream(record=True), await start_upstream(record=True)
    cfg = _config({"a": (native, "openai"), "c": (chat, "openai_compatible")})
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 0, "output_per_mtok": 1000}
    cfg["models"] = {"m": {"deployments": ["d-a"]}, "cheap": {"deployments": ["d-c"]}}
    downgrade = {"at_percent": 1, "action": "downgrade", "to": "cheap"}
    cfg["ledger"] = {"path": str(tmp_path / "l.db"), "flush_interval": 0.05}
    cfg["budgets"] = {"limits": [{"name": "g", "scope": "global", "limit_usd": 1.0, "actions": [downgrade]}]}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0)
        served = []
        for _ in range(3):  # the first one crosses the threshold
            raw = await client.responses.with_raw_response.create(
                model="m", input="Find it", tools=[{"type": "web_search"}]
            )
            assert raw.parse().output_text
            served.append(raw.headers["x-edgeroute-deployment"])
        assert served == ["d-a"] * 3
        plain = await client.responses.with_raw_response.create(model="m", input="Say hello")
        assert plain.headers["x-edgeroute-deployment"] == "d-c"  # downgraded, through chat
        await client.close()


@pytest.mark.parametrize("usage", [None, {"prompt_tokens": "many", "completion_tokens": 3}], ids=["none", "garbage"])
async def test_through_chat_without_a_readable_usage_the_response_says_what_is_charged(
    start_proxy: Any, usage: Any
) -> None:
    """A chat upstream that reports no usage (or one that cannot be read): the request is charged
    at edgeroute's count, which the Response's `usage` now gives, as a stream's does. It said 0
    tokens beside a cost; and an unreadable count failed the answer (a 502 after four calls,
    each paid for) where chat clients got it."""

    async def chat(request: web.Request) -> web.Response:
        message = {"role": "assistant", "content": "hello there friend"}
        answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip
        return web.json_response(answer if usage is None else {**answer, "usage": usage})

    up = await start_routes(web.post("/v1/chat/completions", chat))
    try:
        proxy = await start_proxy(_config({"a": (Upstream(up, MockOptions()), "openai_compatible")}))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.responses.with_raw_response.create(model="m", input="hi there")
        r = raw.parse()
        assert r.output_text == "hello there friend"
        rec = proxy.recorder.records[-1]
        assert rec.usage is not None and rec.usage.estimated and len(rec.attempts) == 1
        assert r.usage is not None and r.usage.output_tokens == rec.usage.completion_tokens > 0
        assert r.usage.input_tokens == rec.usage.prompt_tokens > 0
        assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(rec.cost_usd)
    finally:
        await up.close()
