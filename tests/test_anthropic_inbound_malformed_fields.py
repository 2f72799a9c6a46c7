"""`/v1/messages` at an OpenAI-format upstream: fields Anthropic refuses are the client's 400
in Anthropic's format, naming the field, before any upstream call. They were translated
silently: `tool_choice: 5` dropped, a `tool` choice without its name sent as `name: null`, a
tool without `input_schema` sent with an empty schema, a `tool_result` without `tool_use_id`
sent as a tool message answering no call, `stop_sequences: "STOP"` sent as chat's `stop`, a
`metadata.user_id` that is not a string dropped; the client learnt of its mistake, if at all,
from a translated upstream error."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TOOL = {"name": "f", "input_schema": {"type": "object"}}
MALFORMED = [
    ({"tool_choice": 5}, "tool_choice: Input should be a valid dictionary"),
    ({"tools": [TOOL], "tool_choice": {"type": "tool"}}, "tool_choice.tool.name: Field required"),
    ({"tools": [TOOL, {"name": "g"}]}, "tools.1.custom.input_schema: Field required"),
    (
        {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "r"}]}]},
        "messages.0.content.0.tool_result.tool_use_id: Field required",
    ),
    ({"stop_sequences": "STOP"}, "stop_sequences: Input should be a valid list of strings"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id: Input should be a valid string"),
]


@pytest.mark.parametrize(("extra", "message"), MALFORMED, ids=[m.split(":")[0] for _, m in MALFORMED])
async def test_a_malformed_field_is_a_400_naming_it(
    start_mock: Any, start_proxy: Any, extra: dict[str, Any], message: str
) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    body: dict[str, Any] = {"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(**body)
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    assert not any(r.attempts for r in proxy.recorder.records)  # nothing was asked of the upstream


async def test_well_formed_fields_are_served(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    asked: Any = {
        "tools": [TOOL],
        "tool_choice": {"type": "auto"},
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "u1"},
    }
    msg = await client.messages.create(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "tulips"}], **asked
    )
    assert msg.type == "message"
