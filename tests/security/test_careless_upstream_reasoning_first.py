"""A chat stream that reasons before it answers (`reasoning_content` deltas: DeepSeek's API,
vLLM's reasoning parsers; `reasoning`: OpenRouter) is relayed from its first reasoning delta.

Reasoning was not taken for content: the stream was held, the client shown nothing, until the
first answer token. A model that thinks longer than the provider's `timeouts.first_byte` (60 s
by default; R1 often does) was timed out while it streamed, its attempt failed over (the
reasoning paid for again elsewhere) and the client got a 504. Anthropic's thinking blocks and
a Responses stream's reasoning summary already commit the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest

from tests.security.conftest import ScriptedStreams, Served, failover_config


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "r1"}
    obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE = {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}
ANSWER = (
    _chunk({"content": "42"})
    + _chunk({}, "stop")
    + b"data: "
    + orjson.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "r1", "choices": [], "usage": USAGE}
    )
    + b"\n\ndata: [DONE]\n\n"
)


@pytest.fixture
async def upstreams() -> AsyncIterator[ScriptedStreams]:
    made = ScriptedStreams("/v1/chat/completions")
    yield made
    await made.close()


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_reaches_the_client_before_the_answer(
    upstreams: ScriptedStreams, serve: Any, field: str
) -> None:
    # The upstream thinks until the client has seen its thinking, past the first-byte timeout if need be.
    thinking = _chunk({"role": "assistant", "content": None, field: ""}) + _chunk({field: "Six times seven..."})
    up = await upstreams(thinking, ANSWER)
    cfg = failover_config(up)
    cfg["providers"]["p0"]["timeouts"] = {"first_byte": 1}
    proxy: Served = await serve(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    thought, said = "", ""
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "6 x 7?"}], stream=True
    )
    async for c in stream:
        for choice in c.choices:
            extra = choice.delta.model_extra or {}
            if extra.get(field):
                thought += extra[field]
                upstreams.go.set()
            said += choice.delta.content or ""
    assert (thought, said) == ("Six times seven...", "42")
    rec = proxy.recorder.records[-1]
    assert rec.outcome == "ok" and [a.deployment for a in rec.attempts] == ["d0"]
    assert rec.usage is not None and rec.usage.completion_tokens == 40
