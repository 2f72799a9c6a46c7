"""A Responses `function_call_output` whose `output` holds an image (a tool's screenshot), sent
to a deployment that speaks only chat: a chat tool message holds text alone, and the image was
dropped without a word (the model answered about a screenshot it never saw). It is a 400
naming the deployment, as anything else chat cannot carry is; a deployment that speaks
Responses gets it as sent."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.test_endpoints_responses import _config

CALL = {"type": "function_call", "call_id": "c1", "name": "screenshot", "arguments": "{}"}
IMAGE = {"type": "input_image", "image_url": "https://images.example/screen.png", "detail": "auto"}
OUTPUT: Any = {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}, IMAGE]}


@pytest.mark.parametrize("kind", ["openai_compatible", "openai"])
async def test_an_image_in_a_tool_output_is_never_dropped(start_upstream: Any, start_proxy: Any, kind: str) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config({"c": (up, kind)}))
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0) as client:
        ask: Any = [{"role": "user", "content": "what is on screen?"}, CALL, OUTPUT]
        if kind == "openai":  # speaks Responses: the items reach it as sent
            said = await client.responses.create(model="m", input=ask)
            assert said.status == "completed"
            assert up.options.requests[-1]["body"]["input"][2] == OUTPUT
            return
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="m", input=ask)
    assert refused.value.body == {
        "message": "'input[2].output' has an image, which a chat deployment's tool result cannot take. "
        "The deployment `d-c` speaks only chat.",
        "type": "invalid_request_error",
        "param": "input",
        "code": "invalid_request",
    }
    assert up.options.requests == []
