"""Azure OpenAI and OpenAI-compatible quirks: deployment URLs, api-key, content filter, parameter rules."""

from __future__ import annotations

import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]


async def test_mock_is_honest_for_the_azure_sdk(start_mock) -> None:
    up = await start_mock("azure", api_key="az-key", deployments=["my-gpt"])
    client = openai.AsyncAzureOpenAI(azure_endpoint=up.root, api_key="az-key", api_version="2024-10-21", max_retries=0)
    r = await client.chat.completions.create(model="my-gpt", messages=HELLO)
    assert r.choices[0].message.content.startswith("Hello from my-gpt.")
    chunks = [c async for c in await client.chat.completions.create(model="my-gpt", messages=HELLO, stream=True)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="other", messages=HELLO)
    bad = openai.AsyncAzureOpenAI(azure_endpoint=up.root, api_key="wrong", api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="my-gpt", messages=HELLO)


async def test_proxy_calls_the_deployment_url_with_api_key(start_mock, start_proxy) -> None:
    up = await start_mock("azure", api_key="key-az", deployments=["prod-gpt4o"], record=True)
    proxy = await start_proxy(
        provider_config({"az": up}, models={"az": "prod-gpt4o"}, options={"az": {"api_version": "2025-01-01-preview"}})
    )
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client-key", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=HELLO)
    assert r.choices[0].message.content.startswith("Hello from prod-gpt4o.")
    seen = up.options.requests[-1]
    assert seen["headers"]["api-key"] == "key-az" and "Authorization" not in seen["headers"]
    assert seen["body"]["model"] == "prod-gpt4o"


async def test_content_filter_is_returned_not_retried(start_mock, start_proxy) -> None:
    filtered = await start_mock("azure", record=True)
    other = await start_mock("openai", record=True)
    cfg = provider_config({"az": filtered, "o": other})
    cfg["providers"]["az"]["headers"] = {"x-mock-content-filter": "1"}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=HELLO)
    assert "content management policy" in e.value.message
    assert other.options.requests == []


@pytest.mark.parametrize("rule", ["reject", "drop"])
async def test_openai_compatible_unsupported_params(start_mock, start_proxy, rule: str) -> None:
    up = await start_mock("openai", record=True)
    opts = {
        "unsupported": ["logit_bias", "seed"],
        "unsupported_params": rule,
        "rename_params": {"max_tokens": "max_completion_tokens"},
    }
    cfg = provider_config({"o": up}, options={"o": opts})
    cfg["providers"]["o"]["headers"] = {"x-extra": "quirk"}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    if rule == "reject":
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m", messages=HELLO, seed=1)
        assert e.value.code == "unsupported_parameter" and e.value.param == "seed"
        assert up.options.requests == []
    else:
        r = await client.chat.completions.create(model="m", messages=HELLO, seed=1, max_tokens=50)
        assert r.choices[0].finish_reason == "stop"
        body = up.options.requests[-1]["body"]
        assert "seed" not in body and body["max_completion_tokens"] == 50 and "max_tokens" not in body
    # A request without those parameters goes through byte for byte, with the extra header.
    await client.chat.completions.create(model="m", messages=HELLO)
    assert up.options.requests[-1]["headers"]["x-extra"] == "quirk"
