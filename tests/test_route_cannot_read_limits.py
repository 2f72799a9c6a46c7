"""What a skipped deployment leaves behind: its provider limit, its timeouts, its name in the
explanation. A deployment that cannot read a request is skipped before any call
(`test_route_cannot_read`), but admission had taken its provider limit as the first choice
until the request ended, a route whose deployments none can read it answered the limit's 429
("try again in 12s") rather than the 400 no wait would change, the request was timed by the
skipped deployment's provider, and `/v1/route/explain` named it as the one to serve."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from edgeroute.state import STATE
from tests.conftest import eventually
from tests.providers_fixtures import start_mock
from tests.test_anthropic_passthrough import HELLO
from tests.test_cost_support import require_redis
from tests.test_route_cannot_read import AUDIO, MESSAGE, REFUSED, URL_TURN, client_of, one_route

__all__ = ["start_mock"]

AUDIO_REFUSED = "Content parts of type `input_audio` are not supported by this provider."


def chat_then_anthropic(chat: Any, claude_url: str) -> dict[str, Any]:
    """Model `m` on [d-o: the chat mock, drawn first; d-a: an Anthropic upstream at `claude_url`]."""
    cfg = one_route({"o": chat}, {"o": 1000})
    cfg["providers"]["a"] = {"kind": "anthropic", "base_url": claude_url, "api_key": "key-a"}
    cfg["deployments"]["d-a"] = {**cfg["deployments"]["d-o"], "provider": "a", "weight": 1}
    cfg["models"]["m"]["deployments"] = ["d-o", "d-a"]
    return cfg


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_a_skipped_first_choice_gives_its_provider_limit_back_at_once(
    store: str, start_mock: Any, start_proxy: Any, serve_routes: Any
) -> None:
    """d-o has one request a minute at its provider, and serves model `m` (before d-a) and model
    `only-o`. A URL document on `m`, which d-o cannot read, went to d-a while admission held
    d-o's one request for it: `only-o`, asked meanwhile, got 429 "the only deployment is at its
    provider's rate limit" though that provider had been sent nothing."""
    got: list[bytes] = []
    release = asyncio.Event()

    async def claude(request: web.Request) -> web.Response:
        got.append(await request.read())
        await release.wait()  # the URL document's answer waits: its request is in flight
        return web.json_response(MESSAGE)

    chat = await start_mock("openai", record=True)
    cfg = chat_then_anthropic(chat, (await serve_routes(web.post("/v1/messages", claude))).url)
    cfg["models"]["only-o"] = {"deployments": ["d-o"]}
    cfg["rate_limits"] = {"deployments": {"d-o": {"rpm": 1}}}
    if store == "redis":
        cfg["shared_state"] = {"redis_url": require_redis(), "prefix": f"skip-{uuid.uuid4().hex[:8]}"}
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    held = asyncio.ensure_future(client.messages.create(model="m", max_tokens=20, messages=URL_TURN))
    try:

        async def arrived() -> bool:
            return len(got) == 1

        await eventually(arrived, "the URL document at d-a", every=0.01)
        raw = await client.messages.with_raw_response.create(model="only-o", max_tokens=20, messages=HELLO)
        assert raw.headers["x-edgeroute-deployment"] == "d-o" and len(chat.options.requests) == 1
    finally:
        release.set()
    assert (await held).content[0].type == "text"
    skipping = next(r for r in proxy.recorder.records if r.model == "m")
    assert skipping.skipped and [a.deployment for a in skipping.attempts] == ["d-a"]
    # What d-o's provider was sent is counted, once: not given back again when the request ended.
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(model="only-o", max_tokens=20, messages=HELLO)
    assert "provider's rate limit" in limited.value.message and len(chat.options.requests) == 1


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_a_skipped_first_choice_is_not_held_out_of_selection_nor_failed(
    store: str, start_mock: Any, start_proxy: Any
) -> None:
    """d-o (one request a minute at its provider, drawn first) cannot read a URL document, which
    d-a served. Admission's take of d-o's last request had cooled d-o down in the core as a 429
    would: given back, d-o still showed a failure (`consecutive_failures: 1, error_rate: 1.0`)
    and a minute's cool-down, and the next request it can read went to d-a. A drained limit
    holds d-o out of selection without a failure, and a give-back ends the hold."""
    chat, claude = await start_mock("openai", record=True), await start_mock("anthropic", record=True)
    cfg = chat_then_anthropic(chat, claude.base_url)
    cfg["rate_limits"] = {"deployments": {"d-o": {"rpm": 1}}}
    if store == "redis":
        cfg["shared_state"] = {"redis_url": require_redis(), "prefix": f"hold-{uuid.uuid4().hex[:8]}"}
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    live = proxy.app[STATE].live
    d_o = live.index_of["d-o"]

    def health() -> tuple[Any, ...]:
        h = live.router.health(d_o)
        return h["failures"], h["consecutive_failures"], h["error_rate"], h["cooldown_ms"], h["circuit"]

    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and chat.options.requests == []
    assert health() == (0, 0, 0.0, 0, "closed") and live.router.health(d_o)["limit_hold_ms"] == 0
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=HELLO)
    assert raw.headers["x-edgeroute-deployment"] == "d-o" and len(chat.options.requests) == 1
    # Its last request of the minute sent: held out of selection, and still no failure.
    assert health() == (0, 0, 0.0, 0, "closed") and live.router.health(d_o)["limit_hold_ms"] > 0
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=HELLO)
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and len(chat.options.requests) == 1


async def test_a_drained_provider_limit_leaves_the_in_flight_count_alone(
    start_mock: Any, start_proxy: Any, serve_routes: Any
) -> None:
    """d-a has two requests a minute. The second, taken while the first was in flight, ended an
    attempt in the core that never began (a `rate_limited` report): d-a showed one request in
    flight with two, and load balancing saw it lighter than it was."""
    arrived, release = asyncio.Event(), asyncio.Event()
    got: list[bytes] = []

    async def claude(request: web.Request) -> web.Response:
        got.append(await request.read())
        arrived.set()
        await release.wait()
        return web.json_response(MESSAGE)

    chat = await start_mock("openai", record=True)
    cfg = chat_then_anthropic(chat, (await serve_routes(web.post("/v1/messages", claude))).url)
    cfg["models"]["only-a"] = {"deployments": ["d-a"]}
    cfg["rate_limits"] = {"deployments": {"d-a": {"rpm": 2}}}
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    live = proxy.app[STATE].live
    d_a = live.index_of["d-a"]
    calls = [asyncio.ensure_future(client.messages.create(model="only-a", max_tokens=20, messages=HELLO))]
    try:
        await asyncio.wait_for(arrived.wait(), 30)
        calls.append(asyncio.ensure_future(client.messages.create(model="only-a", max_tokens=20, messages=HELLO)))

        async def both_sent() -> bool:
            return len(got) == 2

        await eventually(both_sent, "both requests at d-a", every=0.01)
        h = live.router.health(d_a)
        assert (h["in_flight"], h["failures"]) == (2, 0) and h["limit_hold_ms"] > 0
    finally:
        release.set()
    for answer in await asyncio.gather(*calls):
        assert answer.content[0].type == "text"
    assert live.router.health(d_a)["in_flight"] == 0


async def test_a_request_no_deployment_can_read_gets_its_400_at_a_provider_limit(
    start_mock: Any, start_proxy: Any
) -> None:
    """Routes whose deployments are at their provider limits: a request none of them can read
    got the limit's 429 and its Retry-After; it gets the 400 that names what they cannot read,
    whether the only deployment is at its limit or the one rerouted to is too."""
    one, two = await start_mock("openai", record=True), await start_mock("openai", record=True)
    claude = await start_mock("anthropic", record=True)
    cfg = one_route({"o": one, "p": two}, {"o": 1000, "p": 1})
    cfg["providers"]["a"] = {"kind": "anthropic", "base_url": claude.base_url, "api_key": "key-a"}
    cfg["deployments"]["d-a"] = {**cfg["deployments"]["d-o"], "provider": "a"}
    cfg["models"]["only-o"] = {"deployments": ["d-o"]}
    cfg["models"]["only-a"] = {"deployments": ["d-a"]}
    cfg["rate_limits"] = {"deployments": {d: {"rpm": 1} for d in ("d-o", "d-p", "d-a")}}
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    for _ in range(2):  # d-o's one request a minute, then d-p's (rerouted to)
        await client.messages.create(model="m", max_tokens=20, messages=HELLO)
    assert len(one.options.requests) == 1 and len(two.options.requests) == 1
    for model in ("only-o", "m"):  # the only deployment at its limit; rerouted to one at its limit
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model=model, max_tokens=20, messages=URL_TURN)
        body: Any = refused.value.body
        assert body["error"]["message"] in {REFUSED.format("d-o"), REFUSED.format("d-p")}
        rec = proxy.recorder.records[-1]
        assert rec.status == 400 and rec.error_class == "unsupported_parameter" and rec.skipped
    # A request they can read is still held to their limits.
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client.messages.create(model="only-o", max_tokens=20, messages=HELLO)
    assert "provider's rate limit" in limited.value.message
    # On /v1/chat/completions too: an audio part the only (Anthropic) deployment cannot read.
    chat = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    await client.messages.create(model="only-a", max_tokens=20, messages=HELLO)  # d-a's one request
    with pytest.raises(openai.BadRequestError) as bad:
        await chat.chat.completions.create(model="only-a", messages=AUDIO)
    assert (bad.value.body or {})["message"] == AUDIO_REFUSED and len(claude.options.requests) == 1
    assert one.options.requests[1:] == two.options.requests[1:] == []


async def test_a_skipped_first_choice_does_not_time_the_request(
    start_mock: Any, start_proxy: Any, serve_routes: Any
) -> None:
    """d-o's provider gives up on a first byte after 0.1 s; d-a's keeps the default minute. A
    URL document skipped d-o and went to d-a, timed by d-o's provider: its answer, 0.3 s away,
    timed out (504)."""

    async def claude(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(0.3)
        return web.json_response(MESSAGE)

    chat = await start_mock("openai", record=True)
    cfg = chat_then_anthropic(chat, (await serve_routes(web.post("/v1/messages", claude))).url)
    cfg["providers"]["o"]["timeouts"] = {"first_byte": 0.1}
    proxy = await start_proxy(cfg)
    raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and raw.headers["x-edgeroute-attempts"] == "1"
    assert (await raw.parse()).content[0].type == "text" and chat.options.requests == []


async def test_explain_names_the_deployment_dispatch_would_send_it_to(start_mock: Any, start_proxy: Any) -> None:
    """An audio part on a route [Anthropic, drawn first; OpenAI]: explain named the Anthropic
    deployment, which dispatch skips; it names the OpenAI one, and the skipped one with why."""
    claude, gpt = await start_mock("anthropic", record=True), await start_mock("openai", record=True)
    proxy = await start_proxy(one_route({"a": claude, "o": gpt}, {"a": 1000, "o": 1}))
    async with aiohttp.ClientSession() as s:

        async def explain(model: str, messages: Any) -> Any:
            async with s.post(f"{proxy.url}/v1/route/explain", json={"model": model, "messages": messages}) as r:
                assert r.status == 200
                return await r.json()

        said = await explain("m", AUDIO)
        assert said["deployment"] == "d-o" and said["fallbacks"] == []
        assert said["skipped"] == [{"deployment": "d-a", "why": AUDIO_REFUSED}]
        said = await explain("m", [{"role": "user", "content": "hi"}])  # both read it
        assert said["deployment"] == "d-a" and said["fallbacks"] == ["d-o"] and said["skipped"] == []
        said = await explain("m-a", AUDIO)  # none can: no deployment, the refusal dispatch answers
        assert said["deployment"] is None and said["skipped"] == [{"deployment": "d-a", "why": AUDIO_REFUSED}]
    assert claude.options.requests == [] and gpt.options.requests == []
