"""The semantic cache with a configured embedder whose model a reload changes.

Vectors of two embedding models do not compare, even of the same size. The index of
earlier answers was kept per route and embedder *name*: after a reload pointed that
deployment at another model, new requests were matched against the old model's vectors,
and an answer to a different question could be served as a hit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
import yaml
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import eventually, routes_upstream, simple_config

BREAD = "How do I bake bread?"
BIKE = "How do I fix a bike?"
# What each model makes of each question: the old model puts the first where the new one puts the second.
VECTORS = {("emb-old", BREAD): 0, ("emb-new", BIKE): 0, ("emb-old", BIKE): 1, ("emb-new", BREAD): 2}


async def _embed(request: web.Request) -> web.Response:
    body = await request.json()
    vector = [0.0] * 8
    vector[VECTORS.get((body["model"], body["input"]), 7)] = 1.0
    data = [{"object": "embedding", "index": 0, "embedding": vector}]
    out = {"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 5, "total_tokens": 5}}
    return web.Response(body=orjson.dumps(out), content_type="application/json")


@pytest.fixture
async def embedder_url() -> AsyncIterator[str]:
    async with routes_upstream(web.post("/v1/embeddings", _embed)) as server:
        yield server.url + "/v1"


async def test_a_reload_to_another_embedding_model_never_matches_the_old_ones_vectors(
    start_upstream: Any, start_proxy: Any, embedder_url: str
) -> None:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    cfg["providers"]["emb"] = {"base_url": embedder_url, "api_key": "sk-embed-key"}
    cfg["deployments"]["embedder"] = {"provider": "emb", "model": "emb-old"}
    cfg["models"]["m"]["cache"] = {"ttl": 60, "mode": "semantic", "embedder": "embedder", "similarity": 0.9}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def ask(text: str) -> tuple[str, str]:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}], temperature=0
        )
        return raw.headers["x-edgeroute-cache"], str(raw.parse().choices[0].message.content)

    label, bread = await ask(BREAD)
    assert label == "miss" and BREAD in bread

    async def stored() -> bool:  # stored and indexed (one write, off the request path)
        return (await ask(BREAD))[0] == "hit"

    await eventually(stored, "the first answer in the cache")

    cfg["deployments"]["embedder"]["model"] = "emb-new"
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)
    label, bike = await ask(BIKE)
    assert (label, BIKE in bike) == ("miss", True), "the bike question got the bread answer"
    assert len(up.options.requests) == 2
    await client.close()
