"""A route whose deployments cannot all read a request sends it to one that can, and never
refuses it while one can. A document by URL or Files API id, or a server tool's turns, on a
route [chat deployment, Anthropic deployment]: the chat one was chosen first and answered 400
("only an Anthropic deployment can"), never going on to the Anthropic one beside it. Now a
deployment that cannot read the request is skipped before any call (no attempt, no spend, no
health report), for the first attempt, a fallback and a hedge alike, and the explanation and
the request log say why; a route that none of whose deployments can read it keeps the 400
naming what they cannot read."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import botocore.session
import openai
import pytest
from aiohttp import web

from edgeroute.dispatch import failover
from edgeroute.state import STATE
from tests.conftest import eventually
from tests.providers_fixtures import MockUpstream, provider_config, start_mock
from tests.test_anthropic_documents import ASK, FILE_DOC, TEXT_DOC, URL_DOC
from tests.test_anthropic_passthrough import CODE_TURNS, EXTRA, HELLO
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

URL_TURN: Any = [{"role": "user", "content": [TEXT_DOC, URL_DOC, ASK]}]
MESSAGE: Any = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "stop_reason": "end_turn",
    "stop_sequence": None, "content": [{"type": "text", "text": "Done."}],
    "usage": {"input_tokens": 9, "output_tokens": 2},
}  # fmt: skip
REFUSED = (
    "The deployment `{}` cannot read messages.0.content.1 (a document whose source is a URL Anthropic fetches:"
    " send it as base64 or text); only an Anthropic deployment can."
)


def one_route(ups: dict[str, MockUpstream], weights: dict[str, int], **options: dict[str, Any]) -> dict[str, Any]:
    """Model `m` over every mock's deployment, in one route; the weights make the first choice."""
    cfg = provider_config(ups, options=options)
    cfg["models"]["m"] = {"deployments": [f"d-{n}" for n in ups]}
    for name, weight in weights.items():
        cfg["deployments"][f"d-{name}"]["weight"] = weight
    return cfg


def client_of(proxy: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)


async def test_a_url_document_goes_to_the_anthropic_deployment_of_its_route(start_mock: Any, start_proxy: Any) -> None:
    chat, claude = await start_mock("openai", record=True), await start_mock("anthropic", record=True)
    proxy = await start_proxy(one_route({"o": chat, "a": claude}, {"o": 1000, "a": 1}))  # the chat one drawn first
    client = client_of(proxy)
    for doc in (URL_DOC, FILE_DOC):
        turn = [{"role": "user", "content": [TEXT_DOC, doc, ASK]}]
        raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=turn)
        said = await raw.parse()
        assert said.content[0].type == "text" and said.content[0].text
        assert raw.headers["x-edgeroute-deployment"] == "d-a" and raw.headers["x-edgeroute-attempts"] == "1"
        assert "skipped d-o: cannot read the request" in raw.headers["x-edgeroute-explain"]
        assert claude.options.requests[-1]["body"]["messages"] == turn  # as sent
    async with client.messages.stream(model="m", max_tokens=20, messages=URL_TURN) as s:
        final = await s.get_final_message()
    assert final.content[0].type == "text" and final.usage.output_tokens > 0
    assert chat.options.requests == [] and len(claude.options.requests) == 3
    rec = proxy.recorder.records[-1]
    assert rec.status == 200 and rec.deployment == "d-a" and [a.deployment for a in rec.attempts] == ["d-a"]
    assert rec.skipped == [("d-o", REFUSED.format("d-o"))]
    # A skip is not a failure: the chat deployment's health is untouched, and it serves what it reads.
    live = proxy.app[STATE].live
    health = live.router.health(live.index_of["d-o"])
    assert (health["failures"], health["circuit"], health["in_flight"]) == (0, "closed", 0)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=HELLO)
    assert raw.headers["x-edgeroute-deployment"] == "d-o" and "skipped" not in raw.headers["x-edgeroute-explain"]


async def test_server_tool_turns_go_to_the_anthropic_deployment_of_their_route(
    start_mock: Any, start_proxy: Any
) -> None:
    chat, claude = await start_mock("openai", record=True), await start_mock("anthropic", record=True)
    for options in ({}, {"o": {"unsupported_params": "drop"}}):  # with drop too: the turns cannot be dropped
        proxy = await start_proxy(one_route({"o": chat, "a": claude}, {"o": 1000, "a": 1}, **options))
        raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=50, messages=CODE_TURNS)
        assert raw.headers["x-edgeroute-deployment"] == "d-a" and (await raw.parse()).content
        assert claude.options.requests[-1]["body"]["messages"] == CODE_TURNS
        assert "x-edgeroute-dropped-params" not in raw.headers
    assert chat.options.requests == []


async def test_a_route_of_chat_deployments_only_still_refuses_by_name(start_mock: Any, start_proxy: Any) -> None:
    one, two = await start_mock("openai", record=True), await start_mock("openai", record=True)
    proxy = await start_proxy(one_route({"o": one, "p": two}, {"o": 1000, "p": 1}))
    client = client_of(proxy)
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="m", max_tokens=20, messages=URL_TURN, stream=stream)
        assert refused.value.body == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": REFUSED.format("d-o")},  # the first choice's
        }
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model="m", max_tokens=50, messages=CODE_TURNS)
    assert "`d-o` cannot honour bash_code_execution_tool_result, server_tool_use" in refused.value.message
    assert one.options.requests == [] and two.options.requests == []
    rec = proxy.recorder.records[-1]
    assert rec.status == 400 and rec.error_class == "unsupported_parameter" and rec.attempts == []
    assert [name for name, _ in rec.skipped or ()] == ["d-o", "d-p"]


async def test_a_fallback_chain_never_hands_the_request_to_a_deployment_that_cannot_read_it(
    start_mock: Any, start_proxy: Any
) -> None:
    """Model `m` on a failing Anthropic deployment, its fallbacks a chat model then another
    Anthropic one: the chat one is passed over, with the second one down too."""
    down, chat = await start_mock("anthropic", fail_status=529), await start_mock("openai", record=True)
    spare = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": down, "o": chat, "b": spare})
    cfg["models"]["m"]["max_attempts"] = 2  # the one it cannot read is no attempt: the spare is still tried
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
    assert raw.headers["x-edgeroute-deployment"] == "d-b" and raw.headers["x-edgeroute-attempts"] == "2"
    async with client.messages.stream(model="m", max_tokens=20, messages=URL_TURN) as s:
        assert (await s.get_final_message()).content
    assert chat.options.requests == [] and len(spare.options.requests) == 2
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d-a", "d-b"] and rec.skipped is not None

    spare.options.fail_status = 500
    with pytest.raises(anthropic.APIStatusError) as failed:
        await client.messages.create(model="m", max_tokens=20, messages=URL_TURN)
    assert failed.value.status_code == 502 and "(tried: d-a, d-b)" in failed.value.message
    assert chat.options.requests == [] and [name for name, _ in proxy.recorder.records[-1].skipped or ()] == ["d-o"]


async def test_a_hedge_never_goes_to_a_deployment_that_cannot_read_the_request(
    start_mock: Any, start_proxy: Any
) -> None:
    slow = await start_mock("anthropic", record=True, latency_ms=30_000)
    chat, fast = await start_mock("openai", record=True), await start_mock("anthropic", record=True)
    cfg = one_route({"s": slow, "o": chat, "f": fast}, {"s": 1000, "o": 10, "f": 1})  # hedge target: the chat one
    cfg["models"]["m"]["hedge"] = {"delay_ms": 50, "budget_percent": 100}
    proxy = await start_proxy(cfg)
    raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
    assert raw.headers["x-edgeroute-deployment"] == "d-f" and raw.headers["x-edgeroute-hedged"] == "true"
    assert chat.options.requests == [] and len(fast.options.requests) == 1


async def test_the_dropped_params_header_is_the_answering_deployments(start_mock: Any, start_proxy: Any) -> None:
    """A chat deployment with `drop` failed and the request failed over to Anthropic, which
    read every field: its answer said `x-edgeroute-dropped-params: cache_control,thinking,top_k`."""
    chat, claude = await start_mock("openai", fail_status=500), await start_mock("anthropic", record=True)
    cfg = one_route({"o": chat, "a": claude}, {"o": 1000, "a": 1}, o={"unsupported_params": "drop"})
    proxy = await start_proxy(cfg)
    raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=100, messages=HELLO, **EXTRA)
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and raw.headers["x-edgeroute-attempts"] == "2"
    assert "x-edgeroute-dropped-params" not in raw.headers
    assert claude.options.requests[-1]["body"]["top_k"] == 5


AUDIO: Any = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is said?"},
            {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
        ],
    }
]


async def test_a_chat_request_skips_a_deployment_whose_provider_cannot_read_a_part(
    start_mock: Any, start_proxy: Any
) -> None:
    """On `/v1/chat/completions` too: an audio part, which the Anthropic translation refuses,
    goes to the OpenAI deployment of its route; a route without one keeps the 400 naming it."""
    claude, gpt = await start_mock("anthropic", record=True), await start_mock("openai", record=True)
    proxy = await start_proxy(one_route({"a": claude, "o": gpt}, {"a": 1000, "o": 1}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=AUDIO)
    assert raw.headers["x-edgeroute-deployment"] == "d-o" and raw.parse().choices[0].message.content
    assert gpt.options.requests[-1]["body"]["messages"] == AUDIO and claude.options.requests == []
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="m-a", messages=AUDIO)
    assert refused.value.body == {
        "message": "Content parts of type `input_audio` are not supported by this provider.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_request",
    }
    assert claude.options.requests == []


async def test_the_request_log_says_which_deployments_were_skipped_and_why(start_mock: Any, tmp_path: Path) -> None:
    chat, claude = await start_mock("openai", record=True), await start_mock("anthropic", record=True)
    cfg = one_route({"o": chat, "a": claude}, {"o": 1000, "a": 1})
    cfg["ledger"] = {"path": str(tmp_path / "log.db"), "flush_interval": 0.05}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
        rid = raw.headers["x-request-id"]
        deadline = time.monotonic() + 30  # the writer flushes every 50 ms: generous on a stalled host
        while True:
            async with s.get(f"{proxy.url}/admin/requests/{rid}") as r:
                if r.status == 200 or time.monotonic() > deadline:
                    one = await r.json()
                    break
            await asyncio.sleep(0.05)
    assert one["deployment"] == "d-a" and [a["deployment"] for a in one["attempts"]] == ["d-a"]
    assert one["skipped"] == [{"deployment": "d-o", "why": REFUSED.format("d-o")}]


async def test_a_skipped_first_choice_does_not_skew_the_weights(start_mock: Any, start_proxy: Any) -> None:
    """Three deployments of weight 1, the chat one drawn first a third of the time: its turns
    went all to the Anthropic one after it in the core's order (40 of 60 against 20); they are
    drawn again between the two by weight."""
    chat = await start_mock("openai", record=True)
    one, two = await start_mock("anthropic", record=True), await start_mock("anthropic", record=True)
    proxy = await start_proxy(one_route({"o": chat, "a": one, "b": two}, {}))
    client = client_of(proxy)
    for _ in range(60):
        await client.messages.create(model="m", max_tokens=5, messages=URL_TURN)
    firsts, seconds = len(one.options.requests), len(two.options.requests)
    assert chat.options.requests == [] and firsts + seconds == 60
    assert seconds > 20  # its own 20, and about half the chat one's 20 (all 20 to the other: 2^-20)


async def test_no_retry_is_spent_on_a_deployment_that_cannot_read_the_request(
    start_mock: Any, start_proxy: Any, serve_routes: Any
) -> None:
    """One retry in the budget, a route [Anthropic deployment that fails once, chat deployment
    whose circuit is open]: choosing the chat one after the failure spent the retry (its circuit
    open), and the Anthropic one could not be tried again (502). It is found out before."""
    calls: list[int] = []

    async def once_down(request: web.Request) -> web.Response:
        await request.read()
        calls.append(1)
        if len(calls) == 1:
            return web.json_response({"type": "error", "error": {"type": "api_error", "message": "down"}}, status=500)
        return web.json_response(MESSAGE)

    flaky, chat = await serve_routes(web.post("/v1/messages", once_down)), await start_mock("openai", record=True)
    cfg = one_route({"o": chat}, {})
    cfg["providers"]["a"] = {"kind": "anthropic", "base_url": flaky.url, "api_key": "key-a"}
    cfg["deployments"]["d-a"] = {**cfg["deployments"]["d-o"], "provider": "a", "weight": 1000}
    cfg["models"]["m"]["deployments"] = ["d-a", "d-o"]
    cfg["retry_budget"] = {"ratio": 0, "min_per_sec": 1, "ttl_ms": 1000}  # one retry a second
    proxy = await start_proxy(cfg)
    live = proxy.app[STATE].live
    for _ in range(5):  # its circuit opened by failures of other requests
        live.router.report(live.index_of["d-o"], "server_error", 1.0)
    assert live.router.health(live.index_of["d-o"])["circuit"] == "open"
    raw = await client_of(proxy).messages.with_raw_response.create(model="m", max_tokens=20, messages=URL_TURN)
    assert raw.headers["x-edgeroute-deployment"] == "d-a" and len(calls) == 2
    assert chat.options.requests == []


async def test_the_502_lists_the_deployments_that_could_not_read_it(start_mock: Any, start_proxy: Any) -> None:
    down, claude = await start_mock("openai", fail_status=500), await start_mock("anthropic", record=True)
    proxy = await start_proxy(one_route({"o": down, "a": claude}, {"o": 1000, "a": 1}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="m", messages=AUDIO)
    body: Any = failed.value.body
    assert failed.value.status_code == 502 and "(tried: d-o" in body["message"]
    skipped = [a for a in body["attempts"] if a["deployment"] == "d-a"]
    assert skipped == [
        {
            "deployment": "d-a",
            "status": 400,
            "error": "cannot_read",
            "message": "Content parts of type `input_audio` are not supported by this provider.",
        }
    ]
    assert claude.options.requests == []


async def test_a_misconfigured_deployment_is_skipped_and_logged_as_an_error(
    start_mock: Any, start_proxy: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment whose request cannot be built for a reason of its own setup (a Bedrock
    provider without AWS credentials: a 5xx, not the request's doing) is passed over as one that
    cannot read the request, and the operator is told at ERROR, not only in the request's record."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(failover, "_misconfigured_logged", {})
    rock, gpt = await start_mock("bedrock"), await start_mock("openai", record=True)
    cfg = one_route({"b": rock, "o": gpt}, {"b": 1000, "o": 1})
    cfg["providers"]["b"]["options"] = {"region": "us-east-1"}  # no keys of its own, none found
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):  # logged once: every request finds it so (a tenant could flood the log)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-o"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "edgeroute.dispatch"]
    why = "No AWS credentials are configured for provider 'b'."
    assert errors == [f"deployment d-b skipped: {why} (logged once a minute)"], errors


async def test_a_provider_without_credentials_is_not_looked_up_for_each_request(
    start_mock: Any, start_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request on a route with a Bedrock deployment without credentials, and every
    `/v1/route/explain` (free), built a request for it, and each build looked for AWS
    credentials again on the event loop: the environment, files and the instance metadata
    service (seconds where it does not answer). Not found, they are not looked for again for
    a while; the deployment is still skipped with why."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    lookups: list[None] = []
    look = botocore.session.Session.get_credentials

    def counted(self: botocore.session.Session) -> Any:
        lookups.append(None)
        return look(self)

    monkeypatch.setattr(botocore.session.Session, "get_credentials", counted)
    rock, gpt = await start_mock("bedrock"), await start_mock("openai", record=True)
    cfg = one_route({"b": rock, "o": gpt}, {"b": 1000, "o": 1})
    cfg["providers"]["b"]["options"] = {"region": "us-east-1"}  # no keys of its own, none found
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    hi = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(**hi)  # type: ignore[call-overload]
            assert raw.headers["x-edgeroute-deployment"] == "d-o"
            async with s.post(f"{proxy.url}/v1/route/explain", json=hi) as r:
                said = await r.json()
            assert said["deployment"] == "d-o" and [x["deployment"] for x in said["skipped"]] == ["d-b"]
    assert len(lookups) == 1
    assert len(gpt.options.requests) == 3 and rock.options.requests == []


async def test_a_request_no_deployment_can_read_gets_its_400_when_they_are_full(
    start_mock: Any, start_proxy: Any
) -> None:
    """The route's only deployment (chat) is at its capacity when a URL document comes, which it
    could never read: passed over as full before its request was built, the request was told
    "at capacity; retry shortly" (429, Retry-After: 1), and an SDK retried what no wait lets
    through. It gets the 400 naming what the deployment cannot read, at once."""
    chat = await start_mock("openai", record=True, latency_ms=5000)
    cfg = one_route({"o": chat}, {"o": 1})
    cfg["deployments"]["d-o"]["max_concurrency"] = 1
    proxy = await start_proxy(cfg)
    client = client_of(proxy)
    busy = asyncio.ensure_future(client.messages.create(model="m", max_tokens=20, messages=HELLO))
    live = proxy.app[STATE].live
    try:

        async def full() -> bool:
            return live.capacity.active(live.index_of["d-o"]) == 1

        await eventually(full, "d-o busy", every=0.01)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="m", max_tokens=20, messages=URL_TURN)
        assert (refused.value.body or {})["error"]["message"] == REFUSED.format("d-o")  # type: ignore[index]
        assert len(chat.options.requests) == 1
    finally:
        busy.cancel()
