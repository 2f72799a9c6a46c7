"""`POST /v1/feedback` reads its body as every other client endpoint does: only the accepted
content types (a browser form's `text/plain` cannot post a score to a keyless gateway and
teach its learner without a CORS preflight), and a repeated key is refused, not guessed at.
Before, the endpoint read its body with aiohttp's `read()` and took any content type."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TEXT = "Janet has 3 apples and buys 5 more. She gives 2 away. How many apples are left?"


def _config(up: Any) -> dict[str, Any]:
    cfg = provider_config({"o": up})
    # An experiment chooses the route: only a route routing chose teaches the learner.
    cfg["models"] = {
        "m-o": {"deployments": ["d-o"]},
        "m": {"experiment": {"variants": [{"route": "m-o", "percent": 100}]}},
    }
    cfg["learning"] = {"feedback": {"max_shift": 0.1}}
    return cfg


async def _learned(s: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with s.get(url + "/admin/learning") as r:
        return [p for p in (await r.json())["posteriors"] if p["route"] == "m-o"]


async def test_feedback_refuses_a_form_and_a_repeated_key(start_mock, serve) -> None:
    up = await start_mock("openai")
    proxy = await serve(_config(up))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": TEXT}]
    )
    rid = raw.headers["x-request-id"]
    await client.close()
    score = b'{"request_id": "%s", "score": 0}' % rid.encode()
    async with aiohttp.ClientSession() as s:
        before = await _learned(s, proxy.url)
        # What `<form enctype="text/plain">` sends: no preflight, so any page could post it.
        async with s.post(proxy.url + "/v1/feedback", data=score, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415, await r.text()
            err = (await r.json())["error"]
            assert err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"
        twice = b'{"request_id": "%s", "score": 1, "score": 0}' % rid.encode()
        async with s.post(proxy.url + "/v1/feedback", data=twice, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["error"]["code"] == "duplicate_key"
        assert await _learned(s, proxy.url) == before  # nothing was learned from either
        async with s.post(proxy.url + "/v1/feedback", data=score, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["accepted"] is True
        assert await _learned(s, proxy.url) != before
