"""A sampling parameter that is not a number, or is outside OpenAI's own range for it, is the
client's 400 naming it at every translating provider (Anthropic, Gemini, Bedrock): it was sent
on (`temperature: true` as JSON `true`, `"hot"` as a string), failed at the upstream and came
back as its error, or was sent as a value the provider misread. A valid value still reaches the
upstream as it was sent."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

BAD = [
    ("temperature", True),
    ("temperature", "hot"),
    ("temperature", -0.5),
    ("temperature", 3),
    ("top_p", 1.5),
    ("top_p", [1]),
    ("presence_penalty", 3.0),
    ("frequency_penalty", False),
]
HI = [{"role": "user", "content": "hi"}]
# Anthropic and Bedrock have no penalties: their unsupported-parameter rule answers those.
CASES = [
    (kind, p, v)
    for kind in ("anthropic", "gemini", "bedrock")
    for p, v in BAD
    if kind == "gemini" or "penalty" not in p
]


@pytest.mark.parametrize(("kind", "param", "value"), CASES)
async def test_bad_sampling_parameter_is_a_400_naming_it(
    start_mock: Any, start_proxy: Any, kind: str, param: str, value: Any
) -> None:
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=HI, extra_body={param: value})  # type: ignore[arg-type]
    await client.close()
    assert isinstance(e.value.body, dict) and e.value.body["param"] == param, e.value.body
    assert [a.outcome for r in proxy.recorder.records for a in r.attempts] == []  # never sent upstream


async def test_gemini_seed_must_be_an_integer(start_mock: Any, start_proxy: Any) -> None:
    up = await start_mock("gemini")
    proxy = await start_proxy(provider_config({"p": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=HI, extra_body={"seed": "7"})  # type: ignore[arg-type]
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "seed"
    got = await client.chat.completions.create(model="m", messages=HI, seed=7, temperature=0.5, top_p=0.9)  # type: ignore[arg-type]
    await client.close()
    assert got.choices[0].message.content


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "bedrock"])
async def test_valid_sampling_parameters_are_served(start_mock: Any, start_proxy: Any, kind: str) -> None:
    up = await start_mock(kind)
    proxy = await start_proxy(provider_config({"p": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(model="m", messages=HI, temperature=0, top_p=1)  # type: ignore[arg-type]
    await client.close()
    assert got.choices[0].message.content
