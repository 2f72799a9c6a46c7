"""`/v1/completions` (legacy) end to end through the official openai SDK."""

from __future__ import annotations

import aiohttp
import openai
import pytest
from openai.types import Completion

from tests.conftest import simple_config
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]


async def test_mock_matches_the_sdk_types(start_upstream) -> None:
    up = await start_upstream()
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="x")
    r = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this")
    assert isinstance(r, Completion) and r.choices[0].text.startswith("Completion from the mock")


async def test_json_and_stream_pass_through_and_are_costed(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, api_key="key-a")
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client")
    raw = await client.completions.with_raw_response.create(model="m", prompt="Say this is a test", max_tokens=30)
    r = raw.parse()
    assert r.choices[0].text.endswith("Say this is a test") and r.usage is not None
    assert raw.headers["x-edgeroute-deployment"] == "d-a"
    assert up.options.requests[-1]["path"] == "/v1/completions"
    assert up.options.requests[-1]["body"]["model"] == "gpt-4o-mini"
    rec = proxy.recorder.records[-1]
    assert rec.cost_usd == pytest.approx((r.usage.prompt_tokens * 1.0 + r.usage.completion_tokens * 2.0) / 1e6)

    text = ""
    stream = await client.completions.create(model="m", prompt="count to three", stream=True)
    async for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
    assert text.endswith("count to three")
    rec = proxy.recorder.records[-1]
    # No usage asked for: the completion is counted from the streamed text, and priced.
    assert rec.status == 200 and rec.stream and rec.usage is not None and rec.usage.completion_tokens > 0
    assert rec.cost_usd > 0

    stream = await client.completions.create(
        model="m", prompt="x y", stream=True, stream_options={"include_usage": True}
    )
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None and proxy.recorder.records[-1].usage.prompt_tokens == usage.prompt_tokens


async def test_stream_fails_over_before_its_first_text(start_upstream, start_proxy) -> None:
    bad = await start_upstream(fail_status=500)
    good = await start_upstream()
    cfg = simple_config({"a": bad, "b": good})
    cfg["deployments"]["d-a"]["weight"] = 1000
    cfg["deployments"]["d-b"]["weight"] = 1
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = await client.completions.with_raw_response.create(model="m", prompt="p", stream=True)
    assert got.headers["x-edgeroute-deployment"] == "d-b"
    text = "".join([c.choices[0].text async for c in got.parse() if c.choices])
    assert text.startswith("Completion from the mock")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": {"a": 1}}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x"}, "model"),
    ],
)
async def test_bad_input(start_upstream, start_proxy, body, param) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(simple_config({"a": up}))
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert up.options.requests == []


async def test_chat_only_provider_is_a_400_naming_the_deployment(start_mock, start_proxy) -> None:

    ant = await start_mock("anthropic")
    proxy = await start_proxy(provider_config({"c": ant}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model="m", prompt="x")
    assert "`d-c`" in e.value.message
