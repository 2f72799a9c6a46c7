"""Hedges stay within the route's own model, and a request with side effects upstream runs once.

Through the proxy with the official SDKs: a slow but healthy request is never hedged to a
fallback model's deployment; a Responses request with an MCP tool, a Messages request with MCP
servers is not hedged, and not retried elsewhere once its upstream may have run it (a timeout
after it was sent, a 500), while a refusal at the door (429, 503) or a connection never made
still fails over, and a request that only asks to be stored (`store: true`) is retried.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from anthropic.types.beta import BetaRequestMCPServerURLDefinitionParam
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses.tool_param import Mcp

from edgeroute.config import Price
from edgeroute.dispatch import side_effects
from edgeroute.dispatch.attempt import Failure
from edgeroute.dispatch.policy import FailoverPolicy, Settings, Stop, Try
from edgeroute.outcome import Outcome
from edgeroute.shadow import MIRRORS
from edgeroute.upstream import DeploymentInfo
from tests.conftest import RoutesServer, ServeRoutes, eventually

Handler = Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]
RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MCP_TOOL: Mcp = {
    "type": "mcp",
    "server_label": "mail",
    "server_url": "https://mcp.example.com/sse",
    "require_approval": "never",
}
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


class Up:
    """A mock upstream that counts its calls and answers with `handler`."""

    def __init__(self, handler: Handler, raw: RawHandler | None = None) -> None:
        self.handler = handler
        self.raw = raw  # answers from the request itself (to write a stream), instead of `handler`
        self.calls = 0
        self.server: RoutesServer | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.json()
        return await (self.handler(body) if self.raw is None else self.raw(request))

    async def start(self, serve_routes: ServeRoutes) -> Up:
        self.server = await serve_routes(web.post("/{tail:.*}", self._serve))
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url


def chat_answer(text: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": USAGE,
    }  # fmt: skip


def response_answer(text: str) -> dict[str, Any]:
    return {
        "id": "resp_" + text.replace(" ", "_"), "object": "response", "created_at": 1, "status": "completed",
        "model": "gpt-4o-mini",
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
    }  # fmt: skip


def message_answer(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 2},
    }  # fmt: skip


def answers(body: dict[str, Any], delay: float = 0.0, status: int = 200) -> Handler:
    async def handle(_: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.json_response(body if status == 200 else {"error": {"message": "boom"}}, status=status)

    return handle


def config(
    ups: dict[str, tuple[str, str]], models: dict[str, Any], timeouts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One provider and deployment `d-NAME` per upstream (`(url, kind)`), the first weighted to go first."""
    cfg: dict[str, Any] = {"providers": {}, "deployments": {}, "models": models, "retry": {"base_ms": 1, "max_ms": 5}}
    for i, (name, (url, kind)) in enumerate(ups.items()):
        cfg["providers"][name] = {"kind": kind, "base_url": url if kind == "anthropic" else url + "/v1", "api_key": "k"}
        if timeouts is not None:
            cfg["providers"][name]["timeouts"] = timeouts
        model = "claude-sonnet-4-5" if kind == "anthropic" else "gpt-4o-mini"
        price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
        cfg["deployments"][f"d-{name}"] = {"provider": name, "model": model, "price": price, "weight": 1000 - i}
    return cfg


def closed_port_url() -> str:
    """A loopback URL nothing listens on: a connection to it is refused before any byte is sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def oai(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


HEDGE = {"delay_ms": 50, "budget_percent": 100}


# -- hedges stay within the route's own model ---------------------------------------------------


@pytest.mark.parametrize("own", [["d-a"], ["d-a", "d-c"]], ids=["one-deployment", "second-drained"])
async def test_a_slow_request_is_never_hedged_to_a_fallback_model(
    own: list[str], serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    a = await Up(answers(chat_answer("from gpt-4o", "gpt-4o"), delay=0.4)).start(serve_routes)
    b = await Up(answers(chat_answer("from the fallback model"))).start(serve_routes)
    c = await Up(answers(chat_answer("from gpt-4o", "gpt-4o"))).start(serve_routes)
    models = {"m": {"deployments": own, "fallbacks": ["m2"], "hedge": HEDGE}, "m2": {"deployments": ["d-b"]}}
    cfg = config({"a": (a.url, "openai"), "b": (b.url, "openai"), "c": (c.url, "openai")}, models)
    cfg["deployments"]["d-c"]["drained"] = True  # out for maintenance: the model has no second deployment
    proxy = await start_proxy(cfg)
    raw = await oai(proxy).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "from gpt-4o"
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and "x-edgeroute-hedged" not in raw.headers
    assert (a.calls, b.calls, c.calls) == (1, 0, 0)


async def test_a_hedge_still_races_the_models_own_second_deployment(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    a = await Up(answers(chat_answer("slow"), delay=0.4)).start(serve_routes)
    c = await Up(answers(chat_answer("fast own"))).start(serve_routes)
    b = await Up(answers(chat_answer("from the fallback model"))).start(serve_routes)
    models = {"m": {"deployments": ["d-a", "d-c"], "fallbacks": ["m2"], "hedge": HEDGE}, "m2": {"deployments": ["d-b"]}}
    proxy = await start_proxy(config({"a": (a.url, "openai"), "c": (c.url, "openai"), "b": (b.url, "openai")}, models))
    raw = await oai(proxy).chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "fast own"
    assert raw.headers["x-edgeroute-hedged"] == "true" and b.calls == 0


# -- requests with side effects upstream run once ------------------------------------------------


async def responses_pair(
    serve_routes: ServeRoutes, start_proxy: Any, first: Handler | Up, extra: dict[str, Any] | None = None
) -> tuple[Any, Up, Up]:
    a = await (first if isinstance(first, Up) else Up(first)).start(serve_routes)
    b = await Up(answers(response_answer("from b"))).start(serve_routes)
    models = {"m": {"deployments": ["d-a", "d-b"], **(extra or {})}}
    timeouts = {"first_byte": 1, "idle": 1, "total": 10}
    proxy = await start_proxy(config({"a": (a.url, "openai"), "b": (b.url, "openai")}, models, timeouts))
    return proxy, a, b


@pytest.mark.parametrize(
    "side_effect", [{"tools": [MCP_TOOL]}, {"tools": [MCP_TOOL], "store": False}], ids=["mcp", "mcp-unstored"]
)
@pytest.mark.parametrize(
    ("first", "status", "code"),
    [(answers(response_answer("from a"), delay=2.5), 504, "upstream_timeout"), (answers({}, status=500), 502, None)],
    ids=["timeout-after-send", "500"],
)
async def test_a_responses_request_with_side_effects_is_not_retried_once_it_may_have_run(
    side_effect: dict[str, Any],
    first: Handler,
    status: int,
    code: str | None,
    serve_routes: ServeRoutes,
    start_proxy: Any,
) -> None:
    proxy, a, b = await responses_pair(serve_routes, start_proxy, first)
    with pytest.raises(openai.APIStatusError) as e:
        await oai(proxy).responses.create(model="m", input="email the board", **side_effect)
    assert e.value.status_code == status and (a.calls, b.calls) == (1, 0)
    assert "not retried on another deployment" in e.value.message and "side effects" in e.value.message
    assert code is None or e.value.code == code


async def test_a_responses_request_with_an_mcp_tool_is_not_hedged(serve_routes: ServeRoutes, start_proxy: Any) -> None:
    proxy, a, b = await responses_pair(
        serve_routes, start_proxy, answers(response_answer("from a"), delay=0.4), {"hedge": HEDGE}
    )
    raw = await oai(proxy).responses.with_raw_response.create(model="m", input="email the board", tools=[MCP_TOOL])
    assert raw.parse().output_text == "from a" and "x-edgeroute-hedged" not in raw.headers
    assert (a.calls, b.calls) == (1, 0)


@pytest.mark.parametrize("status", [429, 503])
async def test_a_request_with_side_effects_refused_at_the_door_still_fails_over(
    status: int, serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    proxy, a, b = await responses_pair(serve_routes, start_proxy, answers({}, status=status))
    got = await oai(proxy).responses.create(model="m", input="email the board", tools=[MCP_TOOL])
    assert got.output_text == "from b" and (a.calls, b.calls) == (1, 1)


async def test_a_request_with_side_effects_fails_over_when_no_connection_was_made(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    b = await Up(answers(response_answer("from b"))).start(serve_routes)
    proxy = await start_proxy(
        config({"a": (closed_port_url(), "openai"), "b": (b.url, "openai")}, {"m": {"deployments": ["d-a", "d-b"]}})
    )
    got = await oai(proxy).responses.create(model="m", input="email the board", tools=[MCP_TOOL], store=True)
    assert got.output_text == "from b" and b.calls == 1


async def test_a_request_without_side_effects_is_still_retried_after_a_500(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    proxy, a, b = await responses_pair(serve_routes, start_proxy, answers({}, status=500))
    got = await oai(proxy).responses.create(model="m", input="hi", store=False)
    assert got.output_text == "from b" and (a.calls, b.calls) == (1, 1)


async def test_a_messages_request_with_mcp_servers_is_not_retried_after_a_500(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    a = await Up(answers({}, status=500)).start(serve_routes)
    b = await Up(answers(message_answer("from b"))).start(serve_routes)
    models = {"m": {"deployments": ["d-a", "d-b"]}}
    proxy = await start_proxy(config({"a": (a.url, "anthropic"), "b": (b.url, "anthropic")}, models))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    mcp: list[BetaRequestMCPServerURLDefinitionParam] = [
        {"type": "url", "url": "https://mcp.example.com/sse", "name": "mail"}
    ]
    with pytest.raises(anthropic.APIStatusError) as e:
        await client.beta.messages.create(
            model="m", max_tokens=50, messages=[{"role": "user", "content": "email the board"}],
            mcp_servers=mcp, betas=["mcp-client-2025-04-04"],
        )  # fmt: skip
    assert e.value.status_code == 502 and (a.calls, b.calls) == (1, 0)
    assert "side effects upstream (`mcp_servers`)" in str(e.value)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_stored_request_is_still_retried_after_a_500(
    api: str, serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    """`store: true` keeps a record, not an action: a retry keeps two, and failover is worth more."""
    if api == "responses":
        proxy, a, b = await responses_pair(serve_routes, start_proxy, answers({}, status=500))
        got = await oai(proxy).responses.create(model="m", input="hi", store=True)
        assert got.output_text == "from b" and (a.calls, b.calls) == (1, 1)
        return
    a = await Up(answers({}, status=500)).start(serve_routes)
    b = await Up(answers(chat_answer("from b"))).start(serve_routes)
    proxy = await start_proxy(
        config({"a": (a.url, "openai"), "b": (b.url, "openai")}, {"m": {"deployments": ["d-a", "d-b"]}})
    )
    answer = await oai(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], store=True
    )
    assert answer.choices[0].message.content == "from b" and (a.calls, b.calls) == (1, 1)


async def breaks_after_created(request: web.Request) -> web.StreamResponse:
    """A Responses stream that breaks after `response.created`, before any output."""
    created = {"type": "response.created", "sequence_number": 0, "response": {**response_answer("a"), "output": []}}
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"event: response.created\ndata: " + orjson.dumps(created) + b"\n\n")
    assert request.transport is not None
    request.transport.abort()  # the MCP tool ran; the stream breaks before any text
    return resp


async def test_a_responses_stream_with_an_mcp_tool_broken_before_content_is_not_retried(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    first = Up(answers({}), raw=breaks_after_created)
    proxy, a, b = await responses_pair(serve_routes, start_proxy, first)
    with pytest.raises(openai.APIStatusError) as e:
        async with await oai(proxy).responses.create(
            model="m", input="email the board", tools=[MCP_TOOL], stream=True
        ) as stream:
            _ = [event async for event in stream]
    assert e.value.status_code == 502 and (a.calls, b.calls) == (1, 0)
    assert "side effects upstream" in e.value.message


# -- a whole answer's body is bounded as a whole ------------------------------------------------


def paced_json(body: dict[str, Any], piece: int, every: float) -> RawHandler:
    """Sends its head at once, then `body` as JSON `piece` bytes every `every` seconds."""

    async def handle(request: web.Request) -> web.StreamResponse:
        data = orjson.dumps(body)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), piece):
            await resp.write(data[i : i + piece])
            await asyncio.sleep(every)
        return resp

    return handle


async def trickle_pair(serve_routes: ServeRoutes, start_proxy: Any, first: RawHandler) -> tuple[Any, Up, Up]:
    a = await Up(answers({}), raw=first).start(serve_routes)
    b = await Up(answers(chat_answer("from b"))).start(serve_routes)
    timeouts = {"first_byte": 1, "idle": 0.5, "total": 8}
    proxy = await start_proxy(
        config({"a": (a.url, "openai"), "b": (b.url, "openai")}, {"m": {"deployments": ["d-a", "d-b"]}}, timeouts)
    )
    return proxy, a, b


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-answered-as-json"])
async def test_an_answer_body_trickled_under_the_idle_timeout_fails_over_in_time(
    stream: bool, serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    trickle = paced_json(chat_answer("from a"), 1, 0.2)  # one byte under every `idle`
    proxy, a, b = await trickle_pair(serve_routes, start_proxy, trickle)
    t0 = time.monotonic()
    got = await oai(proxy).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=stream
    )
    if isinstance(got, openai.AsyncStream):
        text = "".join([c.choices[0].delta.content or "" async for c in got if c.choices])
    else:
        text = got.choices[0].message.content or ""
    assert text == "from b" and (a.calls, b.calls) == (1, 1)
    assert time.monotonic() - t0 < 4  # first_byte + idle, not the total timeout (8 s)


async def test_a_large_answer_body_sent_steadily_past_first_byte_is_served(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    steady = paced_json(chat_answer("x" * 2_000_000), 64 * 1024, 0.05)  # ~1.3 MB/s for 1.5 s
    proxy, a, b = await trickle_pair(serve_routes, start_proxy, steady)
    got = await oai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert len(got.choices[0].message.content or "") == 2_000_000 and (a.calls, b.calls) == (1, 0)


async def test_an_answer_kept_alive_with_whitespace_until_it_is_written_is_served(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    """Some servers send the head at once and a space every few seconds while the model writes;
    the body's allowance counted from the head cut such an answer (a 504 after four paid calls)."""

    async def kept_alive(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(8):  # 3.2 s of keep-alives: past first_byte + idle (1.5 s), each within idle
            await resp.write(b" ")
            await asyncio.sleep(0.4)
        await resp.write(orjson.dumps(chat_answer("from a")))
        return resp

    proxy, a, b = await trickle_pair(serve_routes, start_proxy, kept_alive)
    got = await oai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert got.choices[0].message.content == "from a" and (a.calls, b.calls) == (1, 0)


async def test_a_request_with_side_effects_is_not_mirrored_to_the_shadow_model(
    serve_routes: ServeRoutes, start_proxy: Any
) -> None:
    a = await Up(answers(response_answer("from a"))).start(serve_routes)
    s = await Up(answers(response_answer("from the shadow"))).start(serve_routes)
    models = {"m": {"deployments": ["d-a"], "shadow": {"model": "s", "percent": 100}}, "s": {"deployments": ["d-s"]}}
    proxy = await start_proxy(config({"a": (a.url, "openai"), "s": (s.url, "openai")}, models))
    client = oai(proxy)
    assert (await client.responses.create(model="m", input="email the board", tools=[MCP_TOOL])).output_text == "from a"
    assert (await client.responses.create(model="m", input="hi")).output_text == "from a"
    await eventually(lambda: _calls(s, 1), "the request without side effects mirrored")
    await asyncio.sleep(0.2)
    assert (a.calls, s.calls) == (2, 1)
    assert proxy.app[MIRRORS].skipped == {("m", "side_effects"): 1}


async def _calls(up: Up, n: int) -> bool:
    return up.calls >= n


# -- the policy, driven directly ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    answers=st.lists(
        st.tuples(
            st.sampled_from([o for o in Outcome if o is not Outcome.SUCCESS]),
            st.sampled_from([None, 200, 400, 429, 500, 502, 503, 504, 529]),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    ),
    once=st.booleans(),
)
def test_the_policy_never_sends_a_request_with_side_effects_on_after_it_may_have_run(
    answers: list[tuple[Outcome, int | None, bool]], once: bool
) -> None:
    deps = [DeploymentInfo(i, f"d{i}", "m", "p", Price(input_per_mtok=1.0, output_per_mtok=1.0), 0) for i in range(4)]
    policy = FailoverPolicy(
        "m", ["d0", "d1"], Settings(8, 0.0, 0.0, 0.0), fallbacks_on=lambda key: deps[2:], allowed=lambda d: True,
        is_open=lambda i: False, try_retry=lambda: True, remaining=lambda: 100.0, serving=lambda i: True,
        once=(lambda: "`store: true`" if once else None),
    )  # fmt: skip
    state = policy.start(deps[:2])
    assert policy.hedge_target(state) is None or policy.hedge_target(state) in deps[:2]
    failures: list[Failure] = []
    step = policy.next_attempt(state, None)
    while isinstance(step, Try):
        outcome, status, reached = answers[len(failures) % len(answers)]
        failures.append(Failure(outcome, status, "failed", reached=reached))
        step = policy.next_attempt(state, (step.deployment, failures[-1]))
        if once and side_effects.may_have_run(failures[-1]):
            assert isinstance(step, Stop), "sent on after an upstream may have run it"
            if failures[-1].outcome.retryable:  # one another deployment could have served: said why not
                assert "not retried on another deployment" in step.reason
            else:  # the request's own error, as without side effects
                assert step.error_class == failures[-1].outcome.value
