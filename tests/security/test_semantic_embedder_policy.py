"""Policy bypass through the semantic cache's embedder: the last user turn of every request
went to the configured embedding deployment, whatever the rules allowed for the request.

A route whose semantic cache embeds with a deployment (`cache.embedder`, say a public
embeddings API) sent it the last user turn of each request on the route, before the
answer: a prompt holding an e-mail address, which a rule keeps to the private deployment,
went to the embedder all the same; so did the prompts of a key held to a region the
embedder is not in. Now the embedder gets a request's text only where the rule that routed
the request (its required and excluded tags) and the key's residency would let it go; other
requests skip the semantic lookup (the exact cache still serves them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.cache.semantic import builtin_embedder
from tests.conftest import routes_upstream
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

EMAIL = "jane.doe@example.co.uk"


@pytest.fixture
async def embedder() -> AsyncIterator[tuple[list[str], str]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body["input"])
        vector = builtin_embedder().embed(body["input"]).tolist()
        data = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}], "model": "e"}
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async with routes_upstream(web.post("/v1/embeddings", handle)) as server:
        yield seen, server.url + "/v1"


async def test_the_embedder_never_gets_text_a_rule_keeps_elsewhere(
    start_mock: Any, start_proxy: Any, embedder: tuple[list[str], str]
) -> None:
    seen, url = embedder
    public = await start_mock("openai", record=True)
    private = await start_mock("openai", record=True)
    cfg = provider_config({"pub": public, "priv": private})
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    cfg["deployments"]["d-priv"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 20.0}
    cfg["providers"]["emb"] = {"kind": "openai", "base_url": url, "api_key": "k"}
    cfg["deployments"]["d-emb"] = {"provider": "emb", "model": "text-embedding-test"}
    cfg["models"]["m"] = {
        "deployments": ["d-pub", "d-priv"],
        "strategy": "lowest_cost",
        "cache": {"ttl": 60, "mode": "semantic", "embedder": "d-emb", "similarity": 0.91},
    }
    cfg["rules"] = [
        {"name": "pii-stays-private", "when": {"pii": ["email"]}, "then": {"require_tags": ["privacy:high"]}}
    ]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)

    async def ask(text: str) -> Any:
        msgs: Any = [{"role": "user", "content": text}]
        return await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)

    raw = await ask("What is the capital of France?")
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"
    assert seen == ["What is the capital of France?"]  # the embedder is in use
    for _ in range(2):  # the second time is an exact hit: nothing is embedded either way
        raw = await ask(f"Write a reply to {EMAIL} about the invoice.")
        assert raw.headers["x-edgeroute-rule"] == "pii-stays-private"
    assert not [t for t in seen if EMAIL in t], "the e-mail went to an embedder the rule does not allow"
    assert len(private.options.requests) == 1  # the exact cache still served the repeat
