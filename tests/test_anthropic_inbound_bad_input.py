"""`/v1/messages` at an OpenAI-format upstream: a text block whose `text` is not a string is
the client's 400 in Anthropic's format, as Anthropic answers it. It was read with `str()`:
a null text reached the model as the word "None", and the answer was to another prompt."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TOOL_USE = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": None}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": 5}]}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": None}, TOOL_USE]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"}]},
        ],
    ],
    ids=["null", "missing", "number", "assistant-null"],
)
async def test_text_block_that_is_not_a_string(start_mock, start_proxy, messages: list[dict[str, Any]]) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="m", max_tokens=20, messages=messages)  # type: ignore[arg-type]
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and ".text: Input should be a valid string" in str(body)
    assert not any(r.attempts for r in proxy.recorder.records)  # nothing was asked of the upstream


async def test_text_blocks_that_are_strings_are_served(start_mock, start_proxy) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    msg = await client.messages.create(
        model="m", max_tokens=20, messages=[{"role": "user", "content": [{"type": "text", "text": "tulips"}]}]
    )
    assert msg.content[0].type == "text" and "tulips" in msg.content[0].text
