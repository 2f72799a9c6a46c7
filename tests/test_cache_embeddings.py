"""Embeddings through the response cache (exact match), with the official openai SDK: the
hit header, the ledger's record of a hit, what makes two requests the same, and stale-if-error."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from edgeroute.mock.openai_endpoints import vector
from tests.conftest import Upstream


def _config(up: Upstream, **cache: Any) -> dict[str, Any]:
    return {
        "providers": {"oa": {"base_url": up.base_url, "api_key": "k"}},
        "deployments": {
            "emb": {"provider": "oa", "model": "text-embedding-3-small", "price": {"input_per_mtok": 0.02}}
        },
        "models": {"embed": {"deployments": ["emb"], "cache": {"ttl": 60} | cache}},
    }


def _calls(up: Upstream) -> int:
    return sum(1 for r in up.options.requests if r.get("path") == "/v1/embeddings")


async def test_a_repeated_embedding_is_a_hit_recorded_as_one(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    first = await client.embeddings.with_raw_response.create(model="embed", input=["alpha beta", "gamma"])
    second = await client.embeddings.with_raw_response.create(model="embed", input=["alpha beta", "gamma"])
    assert first.headers["x-edgeroute-cache"] == "miss" and second.headers["x-edgeroute-cache"] == "hit"
    assert "Age" in second.headers and float(second.headers["x-edgeroute-cost-usd"]) == 0
    assert _calls(up) == 1
    a, b = first.parse(), second.parse()
    assert [d.embedding for d in b.data] == [d.embedding for d in a.data]
    assert b.data[0].embedding == pytest.approx(vector("alpha beta", 8), abs=1e-6) and b.usage == a.usage
    miss, hit = proxy.recorder.records[-2], proxy.recorder.records[-1]
    assert (miss.cache, hit.cache, hit.outcome, hit.deployment) == ("miss", "hit", "cache_hit", "emb")
    assert hit.cost_usd == 0 and hit.saved_usd == pytest.approx(miss.cost_usd) and miss.cost_usd > 0


async def test_what_changes_the_vectors_changes_the_entry(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, mode="semantic"))  # embeddings match exactly even on a semantic route
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")

    async def label(**kw: Any) -> str:
        raw = await client.embeddings.with_raw_response.create(model="embed", **{"input": "same text", **kw})
        return raw.headers["x-edgeroute-cache"]

    assert await label() == "miss"
    assert await label(user="someone") == "hit"  # `user` does not change the vectors
    assert await label(dimensions=4) == "miss"
    assert await label(encoding_format="float") == "miss"
    assert await label(input="same  text") == "miss"
    assert await label(input=["same text"]) == "hit"  # a string and a one-item list get the same answer
    assert await label(extra_headers={"x-edgeroute-cache": "bypass"}) == "bypass"
    assert _calls(up) == 5


async def test_only_if_cached_and_stale_if_error(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, ttl=0.05, stale_if_error=60))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await client.embeddings.create(model="embed", input="x", extra_headers={"x-edgeroute-cache": "only-if-cached"})
    assert e.value.status_code == 504 and _calls(up) == 0
    fresh = await client.embeddings.create(model="embed", input="x")
    up.options.fail_status = 503
    await asyncio.sleep(0.1)  # past the ttl, within stale-if-error
    raw = await client.embeddings.with_raw_response.create(model="embed", input="x")
    assert raw.headers["x-edgeroute-cache"] == "stale" and raw.parse().data[0].embedding == fresh.data[0].embedding
    assert proxy.recorder.records[-1].outcome == "cache_stale"


async def test_vectors_of_another_embedding_model_are_never_served(start_upstream, start_proxy) -> None:
    """A route over two embedding models: an entry one produced is not a hit for a request the
    other would serve (their vectors do not compare), even though both may serve the route."""
    up = await start_upstream(record=True)
    cfg = _config(up)
    cfg["deployments"]["large"] = {
        "provider": "oa", "model": "text-embedding-3-large", "price": {"input_per_mtok": 0.13},
    }  # fmt: skip
    cfg["models"]["embed"] |= {"deployments": ["emb", "large"], "strategy": "lowest_cost"}
    cfg["rules"] = [{"name": "big", "when": {"tags": ["large"]}, "then": {"deployments": ["large"]}}]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")

    async def call(*tags: str) -> tuple[str, str]:
        extra = {"x-edgeroute-tags": ",".join(tags)} if tags else {}
        raw = await client.embeddings.with_raw_response.create(model="embed", input="t", extra_headers=extra)
        return raw.headers["x-edgeroute-cache"], raw.headers["x-edgeroute-deployment"]

    assert await call("large") == ("miss", "large")
    assert await call() == ("miss", "emb")  # the cheaper model serves it now: the large model's entry is no answer
    assert await call() == ("hit", "emb")
    models = [r["body"]["model"] for r in up.options.requests if r.get("path") == "/v1/embeddings"]
    assert models == ["text-embedding-3-large", "text-embedding-3-small"]
