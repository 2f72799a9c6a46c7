"""`model`, `max_tokens`, `stream` (and chat's `n`) of the wrong JSON type: the client's 400 in
its API's format, naming the parameter and the type it must be. On `/v1/messages`,
`"stream": "yes"` or `1` was a stream (a 200 Anthropic never gives), and a `max_tokens` of
`"5"`, `true`, `5.5` or `1e308` (or a `model` of 5) said "Field required" of a field present."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"max_tokens": 5, "stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
        ({"max_tokens": 5, "stream": 1}, "stream", "stream: Input should be a valid boolean"),
        ({"max_tokens": "5"}, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"max_tokens": True}, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 5.5}, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 1e308}, "max_tokens", "max_tokens: Input should be a valid integer"),
        ({"max_tokens": 5, "model": 5}, "model", "model: Input should be a valid string"),
        ({"max_tokens": 5, "model": None}, "model", "model: Field required"),
        ({}, "max_tokens", "max_tokens: Field required"),
        # passed through to Anthropic as sent (`top_k`): checked all the same
        ({"max_tokens": 5, "stream": "yes", "top_k": 3}, "stream", "stream: Input should be a valid boolean"),
    ],
)
async def test_messages_wrong_types(start_mock, start_proxy, fields: dict[str, Any], param: str, says: str) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    body = {"model": "m", "messages": HI, **fields}
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.post("/v1/messages", body=body, cast_to=object)
    err = e.value.body
    assert isinstance(err, dict) and err["type"] == "error"
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"] == says
    assert not any(r.attempts for r in proxy.recorder.records)  # nothing was asked of the upstream


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"n": "2"}, "n"),
        ({"n": 1.5}, "n"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"model": 5}, "model"),
    ],
)
async def test_chat_wrong_types(start_mock, start_proxy, fields: dict[str, Any], param: str) -> None:
    up = await start_mock("openai")
    proxy = await start_proxy(provider_config({"p": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.post("/chat/completions", body={"model": "m", "messages": HI, **fields}, cast_to=object)
    err = e.value.body
    assert isinstance(err, dict) and err["type"] == "invalid_request_error" and err["param"] == param, err
    assert f"'{param}'" in err["message"] and "expected" in err["message"], err
    assert not any(r.attempts for r in proxy.recorder.records)
