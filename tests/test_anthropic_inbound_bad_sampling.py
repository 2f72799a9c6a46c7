"""`/v1/messages`: `max_tokens` below 1, and a `temperature`, `top_p` or `top_k` that is not of
its type or outside Anthropic's range, are the client's 400 in Anthropic's format, as Anthropic
answers them, before any upstream (an Anthropic one, passed through, or an OpenAI-format one,
translated). They were sent on (`temperature: true` as `true`) and the upstream's refusal, or
its answer to another request, came back."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("temperature", True),
    ("temperature", 1.5),
    ("temperature", "hot"),
    ("top_p", -0.1),
    ("top_k", 2.5),
    ("top_k", -1),
]


@pytest.mark.parametrize("kind", ["anthropic", "openai"], ids=["passed-through", "translated"])
@pytest.mark.parametrize(("param", "value"), BAD)
async def test_bad_sampling_parameter_is_a_400(
    start_mock: Any, start_proxy: Any, kind: str, param: str, value: Any
) -> None:
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    # Through extra_body: the SDK's own types would refuse some of these before sending.
    extra = {"max_tokens": 20, param: value}
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="m", messages=HI, max_tokens=20, extra_body=extra)  # type: ignore[arg-type]
    await client.close()
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"].startswith(param)
    assert [a.outcome for r in proxy.recorder.records for a in r.attempts] == []  # never sent upstream


@pytest.mark.parametrize("kind", ["anthropic", "openai"], ids=["passed-through", "translated"])
async def test_valid_sampling_parameters_are_served(start_mock: Any, start_proxy: Any, kind: str) -> None:
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    extra = {"temperature": 1, "top_p": 0, **({"top_k": 5} if kind == "anthropic" else {})}
    got = await client.messages.create(model="m", messages=HI, max_tokens=1, extra_body=extra)  # type: ignore[arg-type]
    await client.close()
    assert got.content
