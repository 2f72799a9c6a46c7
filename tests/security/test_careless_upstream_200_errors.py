"""A careless upstream (Anthropic, Gemini, Bedrock, or a proxy in front of one) that answers
HTTP 200 with an error object, or with JSON of another shape, has failed: the request fails
over, or is a 502 naming no answer. The translators read such a body as an answer with no
content: the client got a 200 with an empty message (chat and /v1/messages), paid for at the
prompt's estimated cost, and never reached the next deployment. An error body is classed as its
HTTP twin would be: Anthropic's `overloaded_error` is the deployment's overload (429 when no
other deployment answers), Gemini's 503 a server error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.providers_fixtures import MockUpstream, provider_config, start_mock

__all__ = ["start_mock"]

USER: Any = [{"role": "user", "content": "Say hello"}]
BODIES = {
    "anthropic": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    "gemini": {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
    "bedrock": {"message": "Too many requests, please wait before trying again."},
    "empty": {},
}
# How each body's attempt is classed, and the status when no other deployment answers.
OUTCOME = {"anthropic": ("rate_limited", 429)}


@pytest.fixture
async def careless(serve_routes: ServeRoutes) -> AsyncIterator[Any]:

    async def start(kind: str, body: dict[str, Any]) -> MockUpstream:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response(body)  # HTTP 200

        return MockUpstream(kind, await serve_routes(web.post("/{tail:.*}", handle)), None)

    yield start


CASES = [("anthropic", "anthropic"), ("anthropic", "empty"), ("gemini", "gemini"), ("gemini", "empty"),
         ("bedrock", "bedrock"), ("bedrock", "empty")]  # fmt: skip


@pytest.mark.parametrize(("kind", "body"), CASES)
async def test_a_200_with_an_error_fails_over(start_mock, start_proxy, careless, kind: str, body: str) -> None:
    bad = await careless(kind, BODIES[body])
    good = await start_mock("openai")
    proxy = await start_proxy(provider_config({"bad": bad, "good": good}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(model="m", messages=USER)
    assert got.choices[0].message.content and "hello" in got.choices[0].message.content.lower()
    rec = proxy.recorder.records[-1]
    assert [a.deployment for a in rec.attempts] == ["d-bad", "d-good"]
    assert rec.attempts[0].outcome == OUTCOME.get(body, ("server_error", 502))[0]
    assert "without an answer" in (rec.attempts[0].error or "") or "with an error" in (rec.attempts[0].error or "")

    aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    msg = await aclient.messages.create(model="m", max_tokens=50, messages=USER)
    assert msg.content and msg.content[0].type == "text" and "hello" in msg.content[0].text.lower()


@pytest.mark.parametrize(("kind", "body"), CASES)
async def test_a_200_with_an_error_alone_is_a_502(start_proxy, careless, kind: str, body: str) -> None:
    status = OUTCOME.get(body, ("server_error", 502))[1]
    bad = await careless(kind, BODIES[body])
    proxy = await start_proxy(provider_config({"bad": bad}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=USER)
    assert e.value.status_code == status
    aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as ae:
        await aclient.messages.create(model="m", max_tokens=50, messages=USER)
    assert ae.value.status_code == status
    assert all(r.cost_usd == 0 for r in proxy.recorder.records)  # no answer, nothing charged
