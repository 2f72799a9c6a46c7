"""A prompt longer than every context window that may serve it is the client's error.

It was answered 503 `no_deployment_available`: the official SDKs retry a 503 twice, so each such
request was decided three times (its body read and parsed three times), and the client was told
of an outage where OpenAI itself says 400 `context_length_exceeded`. It is now that 400, in
each API's own error format, and no upstream is called."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import simple_config

LONG = "word " * 2000  # ~2,000 tokens


async def _proxy(start_upstream: Any, start_proxy: Any) -> tuple[Any, Any]:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    for d in cfg["deployments"].values():
        d["context_window"] = 1000
    return up, await start_proxy(cfg)


async def test_openai_clients_get_context_length_exceeded_once(start_upstream: Any, start_proxy: Any) -> None:
    up, proxy = await _proxy(start_upstream, start_proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")  # the SDK's default retries
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": LONG}])
    assert e.value.status_code == 400
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert "maximum context length is 1000 tokens" in e.value.message
    assert len(proxy.recorder.records) == 1  # asked once: a 400 is not retried
    assert proxy.recorder.records[0].error_class == "context_length_exceeded"
    assert not up.options.requests
    await client.close()


async def test_anthropic_clients_get_an_invalid_request_error(start_upstream: Any, start_proxy: Any) -> None:
    up, proxy = await _proxy(start_upstream, start_proxy)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x")
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="m", max_tokens=16, messages=[{"role": "user", "content": LONG}])
    assert e.value.status_code == 400
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "maximum context length is 1000 tokens" in e.value.message
    assert len(proxy.recorder.records) == 1 and not up.options.requests
    await client.close()
