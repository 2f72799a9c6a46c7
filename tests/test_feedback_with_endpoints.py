"""Feedback (`POST /v1/feedback`) on requests served by the endpoints beyond chat: a Responses
request, an Anthropic Messages request passed through with Anthropic-only fields, a legacy
completion. Each is decided (route and task) as chat is, so its score teaches the learner
as a chat request's does; before, only chat remembered what it served, and feedback naming
one of these request ids was refused as unknown (404) and nothing was learned.

The proxy is the real app on edgeroute's HTTP server, the official SDKs are the clients."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many apples are left?"


def _config(openai_up: Any, anthropic_up: Any) -> dict[str, Any]:
    cfg = provider_config({"o": openai_up, "a": anthropic_up})
    # Experiments choose the routes: only a route routing chose teaches the learner.
    cfg["models"] = {
        "m-o": {"deployments": ["d-o"]},
        "claude-a": {"deployments": ["d-a"]},
        "m": {"experiment": {"variants": [{"route": "m-o", "percent": 100}]}},
        "claude": {"experiment": {"variants": [{"route": "claude-a", "percent": 100}]}},
    }
    cfg["learning"] = {"feedback": {"max_shift": 0.1}}
    return cfg


async def _feedback(url: str, request_id: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/feedback", json={"request_id": request_id, "score": 1.0}) as r:
            return r.status, await r.json()


async def _posterior(url: str, route: str, task: str) -> float:
    """The learner's alpha for (task, route): what a score of 1 raises (0 when none is held)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/learning") as r:
        assert r.status == 200
        got = await r.json()
    return next((p["alpha"] for p in got["posteriors"] if p["route"] == route and p["task"] == task), 0.0)


async def test_feedback_on_responses_messages_and_completions_teaches_the_learner(start_mock, start_proxy) -> None:
    o = await start_mock("openai")
    a = await start_mock("anthropic")
    proxy = await start_proxy(_config(o, a))
    oc = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ac = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)

    served: list[tuple[str, str]] = []  # (request id, route)
    raw = await oc.responses.with_raw_response.create(model="m", input=TEXT)
    assert raw.parse().output_text
    served.append((raw.headers["x-request-id"], "m-o"))
    stream = await oc.responses.with_raw_response.create(model="m", input=TEXT, stream=True)
    assert [ev.type async for ev in stream.parse()][-1] == "response.completed"
    served.append((stream.headers["x-request-id"], "m-o"))
    # top_k is Anthropic's own: the request is passed through to the Anthropic deployment as sent.
    msg = await ac.messages.with_raw_response.create(
        model="claude", max_tokens=200, messages=[{"role": "user", "content": TEXT}], extra_body={"top_k": 5}
    )
    assert (await msg.parse()).content[0].type == "text"
    served.append((msg.headers["x-request-id"], "claude-a"))
    comp = await oc.completions.with_raw_response.create(model="m", prompt=TEXT, max_tokens=20)
    assert comp.parse().choices[0].text
    served.append((comp.headers["x-request-id"], "m-o"))

    for rid, route in served:
        before = await _posterior(proxy.url, route, "math")
        status, body = await _feedback(proxy.url, rid)
        assert status == 200, (rid, route, body)
        assert body["route"] == route and body["task"] == "math"
        assert await _posterior(proxy.url, route, "math") > before  # the score moved the learner

    await oc.close()
    await ac.close()
