"""`/v1/embeddings` end to end through the official openai SDK, against mock upstreams whose
wire format the providers' own SDKs accept."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import openai
import pytest
from google import genai
from google.genai import types as gtypes
from openai.types import CreateEmbeddingResponse

from edgeroute.mock.openai_endpoints import vector
from tests.conftest import simple_config
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]


def _embed_config(up_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"oa": {"base_url": up_url, "api_key": "key-oa-upstream-secret"}},
        "deployments": {
            "emb": {"provider": "oa", "model": "text-embedding-3-small", "price": {"input_per_mtok": 0.02}},
        },
        "models": {"embed": {"deployments": ["emb"]}},
        **extra,
    }


async def test_mock_matches_the_sdk_types(start_upstream) -> None:
    """The mock upstream answers what the SDK's own types accept (floats and base64)."""
    up = await start_upstream()
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="x")
    r = await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"], dimensions=4)
    assert isinstance(r, CreateEmbeddingResponse) and len(r.data) == 2 and len(r.data[0].embedding) == 4


async def test_dimensions_past_any_models_are_a_400_from_the_mocks(start_upstream, start_proxy, start_mock) -> None:
    """Passed through by the proxy, refused by the mocks as the providers refuse them: the mock
    built a list of `dimensions` floats, and `2**53` took its process past the machine's memory."""
    up = await start_upstream()
    proxy = await start_proxy(_embed_config(up.base_url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.embeddings.create(model="embed", input="x", dimensions=100_000)
    assert "dimensions" in e.value.message, e.value.body
    gem = await start_mock("gemini", api_key="key-g")
    cfg = provider_config({"g": gem})
    cfg["deployments"]["d-g"]["model"] = "text-embedding-004"
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        await client.embeddings.create(model="m", input="x", dimensions=100_000)
    assert len((await client.embeddings.create(model="m", input="x", dimensions=3072)).data[0].embedding) == 3072


async def test_embeddings_routed_priced_and_recorded(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, api_key="key-oa-upstream-secret")
    proxy = await start_proxy(_embed_config(up.base_url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client-key")
    raw = await client.embeddings.with_raw_response.create(model="embed", input=["hello world", "good bye now"])
    r = raw.parse()
    assert [d.index for d in r.data] == [0, 1]
    # The SDK asked for base64 (its default) and decoded it: the vectors are the upstream's.
    assert r.data[0].embedding == pytest.approx(vector("hello world", 8), abs=1e-6)
    assert r.model == "embed"
    assert r.usage.prompt_tokens == 5 and r.usage.total_tokens == 5
    assert raw.headers["x-edgeroute-deployment"] == "emb"
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(5 * 0.02 / 1e6)
    seen = up.options.requests[-1]
    assert seen["path"] == "/v1/embeddings" and seen["body"]["model"] == "text-embedding-3-small"
    assert seen["body"]["input"] == ["hello world", "good bye now"]
    assert seen["headers"]["Authorization"] == "Bearer key-oa-upstream-secret"
    rec = proxy.recorder.records[-1]
    assert (rec.status, rec.route, rec.deployment, rec.outcome) == (200, "embed", "emb", "ok")
    assert rec.usage is not None and rec.usage.prompt_tokens == 5
    assert rec.cost_usd == pytest.approx(5 * 0.02 / 1e6)


async def test_float_format_token_arrays_and_dimensions(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_embed_config(up.base_url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    r = await client.embeddings.create(model="embed", input=[[1, 2, 3], [4, 5]], encoding_format="float", dimensions=3)
    assert [len(d.embedding) for d in r.data] == [3, 3]
    assert r.data[1].embedding == pytest.approx(vector([4, 5], 3))
    assert up.options.requests[-1]["body"]["dimensions"] == 3
    one = await client.embeddings.create(model="embed", input=[7, 8, 9], encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "embed"}, "input"),
        ({"model": "embed", "input": ""}, "input"),
        ({"model": "embed", "input": []}, "input"),
        ({"model": "embed", "input": ["ok", ""]}, "input"),
        ({"model": "embed", "input": [1, -2]}, "input"),
        ({"model": "embed", "input": [[1], []]}, "input"),
        ({"model": "embed", "input": [{"text": "x"}]}, "input"),
        ({"model": "embed", "input": ["x"] * 2049}, "input"),
        ({"model": "embed", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "embed", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "embed", "input": "x", "temperature": 1}, "temperature"),
        ({"input": "x"}, "model"),
    ],
)
async def test_bad_input_is_a_400_in_openai_format(start_upstream, start_proxy, body, param) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_embed_config(up.base_url))
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/embeddings", json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert up.options.requests == []  # refused before any call
    assert proxy.recorder.records[-1].status == 400


async def test_unknown_model_and_chat_only_deployment(start_upstream, start_proxy, start_mock) -> None:
    up = await start_upstream()
    ant = await start_mock("anthropic")
    cfg = _embed_config(up.base_url)
    cfg["providers"]["ant"] = {"kind": "anthropic", "base_url": ant.base_url, "api_key": "ant-secret-key"}
    cfg["deployments"]["claude"] = {"provider": "ant", "model": "claude-x"}
    cfg["models"]["chat-only"] = {"deployments": ["claude"]}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        await client.embeddings.create(model="chat-only", input="x")
    assert "`claude`" in e.value.message and "ant-secret-key" not in str(e.value.body)


async def test_failover_to_the_next_deployment(start_upstream, start_proxy) -> None:
    bad = await start_upstream(fail_status=503)
    good = await start_upstream(record=True)
    cfg = simple_config({"a": bad, "b": good})
    for d in cfg["deployments"].values():
        d["model"] = "text-embedding-3-small"
    cfg["models"]["m"]["strategy"] = "weighted"
    cfg["deployments"]["d-a"]["weight"] = 1000
    cfg["deployments"]["d-b"]["weight"] = 1
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.embeddings.with_raw_response.create(model="m", input="fail over")
    assert raw.headers["x-edgeroute-deployment"] == "d-b"
    rec = proxy.recorder.records[-1]
    assert [a.outcome for a in rec.attempts][-1] == "success" and len(rec.attempts) >= 2
    assert rec.cost_usd > 0


async def test_upstream_errors_are_openai_errors_without_secrets(start_upstream, start_proxy) -> None:
    up = await start_upstream(api_key="another-key")  # refuses our key
    proxy = await start_proxy(_embed_config(up.base_url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await client.embeddings.create(model="embed", input="x")
    assert e.value.status_code >= 500
    assert "key-oa-upstream-secret" not in str(e.value.body)
    assert proxy.recorder.records[-1].status == e.value.status_code


@pytest.mark.filterwarnings("ignore:Inheritance class:DeprecationWarning")  # google-genai subclasses aiohttp's session
async def test_gemini_deployment_translated(start_mock, start_proxy) -> None:
    gem = await start_mock("gemini", api_key="key-g", record=True)
    # The mock speaks what Google's own SDK sends and reads.
    http = gtypes.HttpOptions(
        base_url=gem.root, api_version="v1beta", retry_options=gtypes.HttpRetryOptions(attempts=1)
    )
    g = genai.Client(api_key="key-g", http_options=http)
    got = await g.aio.models.embed_content(model="text-embedding-004", contents=["alpha", "beta"])
    assert got.embeddings is not None and got.embeddings[1].values == pytest.approx(vector("beta", 8))

    cfg = provider_config({"g": gem})
    cfg["deployments"]["d-g"]["model"] = "text-embedding-004"
    cfg["deployments"]["d-g"]["price"] = {"input_per_mtok": 0.15}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    r = await client.embeddings.create(model="m", input=["alpha", "beta"], dimensions=5)
    assert [len(d.embedding) for d in r.data] == [5, 5]
    assert r.data[0].embedding == pytest.approx(vector("alpha", 5), abs=1e-6)
    # Gemini reports no usage: counted with the deployment's tokenizer, and priced.
    assert r.usage.prompt_tokens > 0
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.estimated and rec.cost_usd > 0
    sent = gem.options.requests[-1]["body"]["requests"]
    assert sent[0]["model"] == "models/text-embedding-004" and sent[0]["outputDimensionality"] == 5
    with pytest.raises(openai.BadRequestError) as e:
        await client.embeddings.create(model="m", input=[[1, 2]])
    assert "token-array" in e.value.message
    f = await client.embeddings.create(model="m", input="one", encoding_format="float")
    assert all(math.isfinite(v) for v in f.data[0].embedding)
