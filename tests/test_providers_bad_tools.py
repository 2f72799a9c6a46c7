"""A function tool whose `parameters` (Anthropic: `input_schema`) or `description` is not of its
type is the client's 400 naming `tools`, in the client's API format, at every translating
provider: it was sent on, failed at the upstream, and came back as a 502 after retries."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

BAD_FUNCTIONS = [
    {"name": "f", "parameters": "an object, surely"},
    {"name": "f", "parameters": ["type", "object"]},
    {"name": "f", "description": 5},
]


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "bedrock"])
@pytest.mark.parametrize("fn", BAD_FUNCTIONS)
async def test_openai_client_bad_tool(start_mock, start_proxy, kind: str, fn: dict[str, Any]) -> None:
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": fn}],  # type: ignore[list-item]
        )
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "tools"
    assert [a.outcome for r in proxy.recorder.records for a in r.attempts] == []  # never sent upstream


@pytest.mark.parametrize(
    "tool", [{"name": "f", "input_schema": "x"}, {"name": "f", "input_schema": {}, "description": 5}]
)
async def test_anthropic_client_bad_tool(start_mock, start_proxy, tool: dict[str, Any]) -> None:
    up = await start_mock("gemini")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            tools=[tool],  # type: ignore[list-item]
        )
    assert e.value.body["type"] == "error" and "tools" in e.value.body["error"]["message"]  # type: ignore[index]
