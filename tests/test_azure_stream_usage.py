"""Streams to Azure are asked for their usage only where the API version takes the field.

edgeroute adds `stream_options.include_usage` to every stream upstream, so that a stream is
priced by the provider's usage (hidden reasoning tokens included). Azure API versions older
than 2024-09-01-preview answer that field with a 400 ("Unrecognized request argument
supplied"): every stream through a deployment pinned to such a version would have failed."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock  # noqa: F401 - the fixture


@pytest.mark.parametrize("version", ["2024-06-01", "2024-10-21"])
async def test_streams_through_any_azure_version(start_mock: Any, start_proxy: Any, version: str) -> None:  # noqa: F811
    up = await start_mock("azure", record=True)
    cfg = provider_config({"az": up}, options={"az": {"api_version": version}})
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    (sent,) = up.options.requests
    asked = sent["body"].get("stream_options")
    assert asked == (None if version == "2024-06-01" else {"include_usage": True})
    rec = proxy.recorder.records[-1]
    assert rec.status == 200 and rec.attempts[-1].cost_usd > 0
    await client.close()
