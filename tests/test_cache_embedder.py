"""The semantic cache with a configured embeddings deployment: the last user turn goes to the
deployment's `/embeddings` (its provider's URL and key), paraphrases hit, near misses do
not, and an embedder that fails, stalls or answers garbage only makes misses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from edgeroute import config as config_mod
from edgeroute.cache.semantic import builtin_embedder
from tests.conftest import routes_upstream, simple_config
from tests.test_cache import stored


class Embeddings:
    """An OpenAI-format embeddings server (real vectors: the built-in model's, as 256 floats)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.mode = "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        self.auth.append(request.headers.get("Authorization"))
        if self.mode == "error":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if self.mode == "slow":
            await asyncio.sleep(2)
        if self.mode == "garbage":
            return web.json_response({"data": [{"embedding": ["x", None]}]})
        vector = builtin_embedder().embed(body["input"]).tolist()
        return web.Response(
            body=orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                               "model": body["model"], "usage": {"prompt_tokens": 5, "total_tokens": 5}}),
            content_type="application/json",
        )  # fmt: skip


@pytest.fixture
async def embeddings() -> AsyncIterator[tuple[Embeddings, str]]:
    e = Embeddings()
    async with routes_upstream(web.post("/v1/embeddings", e.handle)) as server:
        yield e, server.url + "/v1"


def _config(up: Any, emb_url: str, **cache: Any) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["providers"]["emb"] = {"base_url": emb_url, "api_key": "sk-embed-key"}
    cfg["deployments"]["embedder"] = {"provider": "emb", "model": "text-embedding-test"}
    cfg["models"]["m"]["cache"] = {"ttl": 60, "mode": "semantic", "embedder": "embedder", "similarity": 0.91} | cache
    return cfg


async def test_a_configured_embedder_serves_paraphrases_and_refuses_near_misses(
    start_upstream: Any, start_proxy: Any, embeddings: tuple[Embeddings, str]
) -> None:
    emb, url = embeddings
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")

    async def ask(text: str) -> Any:
        msgs: Any = [{"role": "user", "content": text}]
        return await client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0)

    first = await ask("How do I reset my password?")
    assert first.headers["x-edgeroute-cache"] == "miss"
    await stored(proxy)
    para = await ask("How can I reset my password?")
    assert para.headers["x-edgeroute-cache"] == "hit" and len(up.options.requests) == 1
    assert para.parse().choices[0].message.content == first.parse().choices[0].message.content
    near = await ask("How do I reset my 2 passwords?")
    assert near.headers["x-edgeroute-cache"] == "miss" and len(up.options.requests) == 2
    assert emb.calls[0] == {"model": "text-embedding-test", "input": "How do I reset my password?",
                            "encoding_format": "float"}  # fmt: skip
    assert set(emb.auth) == {"Bearer sk-embed-key"}, "the embedder's provider key, never the client's"


@pytest.mark.parametrize("mode", ["error", "slow", "garbage"])
async def test_a_failing_embedder_only_makes_misses(
    start_upstream: Any, start_proxy: Any, embeddings: tuple[Embeddings, str], mode: str
) -> None:
    emb, url = embeddings
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up, url, embed_timeout_ms=300))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    emb.mode = mode
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "How do I reset my password?"}], temperature=0
        )
        assert raw.http_response.status_code == 200 and raw.headers["x-edgeroute-cache"] in ("miss", "hit")
        await asyncio.sleep(0.1)
    # The identical request still hits the exact cache; only matching by meaning was lost.
    assert len(up.options.requests) == 1
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["edgeroute_cache_embedding_errors"].samples[0].value >= 1, "counted"


def test_the_embedder_must_be_an_openai_format_deployment() -> None:
    base: dict[str, Any] = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9"}, "claude": {"kind": "anthropic", "base_url": "http://127.0.0.1:9"}},
        "deployments": {"d": {"provider": "p", "model": "x"}, "c": {"provider": "claude", "model": "y"}},
        "models": {"m": {"deployments": ["d"], "cache": {"mode": "semantic", "embedder": "nope"}}},
    }  # fmt: skip
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(base, "t.yaml")
    assert "models.m.cache.embedder" in str(e.value) and "unknown deployment" in str(e.value)
    base["models"]["m"]["cache"]["embedder"] = "c"
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(base, "t.yaml")
    assert "OpenAI's format" in str(e.value)
    base["models"]["m"]["cache"]["embedder"] = "d"
    config_mod.parse(base, "t.yaml")
