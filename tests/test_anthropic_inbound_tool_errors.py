"""`/v1/messages` translated: a `tool_result` marked `is_error: true` tells the model its call
failed, whatever the deployment. The flag was dropped: an OpenAI-format upstream (and Gemini,
Bedrock) saw the failed call's message as its plain result, and an Anthropic deployment reached
through the chat translation got the result without `is_error`."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

TOOLS: Any = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
FAILED = "the weather service timed out"


def _history(**result: Any) -> Any:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": FAILED, **result}]},
    ]


def _tool_result(kind: str, body: dict[str, Any]) -> Any:
    """What the upstream was told of the tool's result, in its own format."""
    if kind == "anthropic":
        return body["messages"][-1]["content"][0]
    if kind == "gemini":
        return body["contents"][-1]["parts"][0]["functionResponse"]["response"]
    if kind == "bedrock":
        return body["messages"][-1]["content"][0]["toolResult"]["content"][0]["text"]
    return body["messages"][-1]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "bedrock"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_tool_call_is_told_to_the_model(start_mock, start_proxy, kind: str, stream: bool) -> None:
    up = await start_mock(kind, record=True)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    for is_error in (True, False, None):
        extra = {} if is_error is None else {"is_error": is_error}
        if stream:
            async with client.messages.stream(model="m", max_tokens=20, tools=TOOLS, messages=_history(**extra)) as s:
                msg = await s.get_final_message()
        else:
            msg = await client.messages.create(model="m", max_tokens=20, tools=TOOLS, messages=_history(**extra))
        assert msg.stop_reason == "end_turn"
        seen = _tool_result(kind, up.options.requests[-1]["body"])
        text = f"Error: {FAILED}" if is_error else FAILED
        if kind == "openai":
            assert seen == {"role": "tool", "tool_call_id": "toolu_1", "content": text}
        elif kind == "anthropic":
            assert seen["content"] == text and seen.get("is_error") is (True if is_error else None), seen
        else:
            assert text in str(seen) and (is_error or "Error" not in str(seen)), seen


@pytest.mark.parametrize("value", ["yes", 1, {"a": 1}])
async def test_an_is_error_that_is_not_a_boolean_is_a_400(start_mock, start_proxy, value: Any) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="m", max_tokens=20, tools=TOOLS, messages=_history(is_error=value))
    body = e.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "messages.2.content.0.is_error: Input should be a valid boolean" in body["error"]["message"]
    assert not up.options.requests  # nothing was asked of the upstream


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_failed_result_that_says_error_already_is_not_prefixed_twice(
    start_mock, start_proxy, kind: str
) -> None:
    """Clients often write a failed call's result as "Error: ..." themselves: it reached the
    model as "Error: Error: ...", and an Anthropic deployment as a result the client never sent."""
    up = await start_mock(kind, record=True)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    history = _history(is_error=True)
    history[-1]["content"][0]["content"] = f"Error: {FAILED}"
    msg = await client.messages.create(model="m", max_tokens=20, tools=TOOLS, messages=history)
    assert msg.stop_reason == "end_turn"
    seen = _tool_result(kind, up.options.requests[-1]["body"])
    if kind == "openai":
        assert seen["content"] == f"Error: {FAILED}", seen
    else:
        assert (seen["content"], seen.get("is_error")) == (f"Error: {FAILED}", True), seen
