"""Embeddings from a configured deployment, for the semantic cache (`cache.embedder`).

The built-in embedder (static word vectors, in process) is the default; a route may instead
name a deployment whose provider speaks OpenAI's format, and the last user turn is sent to
its `/embeddings` endpoint (`options.embeddings_path` to change the path) through that
provider's own connection pool, URL and key. Whatever goes wrong — a timeout, an error
status, an answer that is not one finite vector — raises `EmbeddingError`: the caller
counts it and treats the request as a miss, so an embeddings outage never fails a request.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
from yarl import URL

from edgeroute.providers.openai import OpenAIAdapter
from edgeroute.upstream import Upstream

MAX_DIM = 16_384
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # ~16k floats as JSON text, with room to spare


class EmbeddingError(Exception):
    pass


async def embed(upstream: Upstream, model: str, text: str, timeout_s: float) -> Any:
    """The normalised embedding (float32 numpy vector) of `text` from `model` at `upstream`."""
    import numpy as np

    adapter = upstream.adapter
    if not isinstance(adapter, OpenAIAdapter):  # the config check refuses this; a reload race
        raise EmbeddingError(f"provider {upstream.name} does not speak OpenAI's format")
    provider = adapter.provider
    url = URL(provider.base_url + str(provider.options.get("embeddings_path", "/embeddings")))
    headers = {"Content-Type": "application/json", **provider.headers, **adapter.auth_headers()}
    body = orjson.dumps({"model": model, "input": text, "encoding_format": "float"})
    try:
        async with asyncio.timeout(timeout_s):
            async with await upstream.client.request("POST", url, headers, body) as resp:
                status = resp.status
                parts: list[bytes] = []
                size = 0
                while piece := await resp.readany():  # bounded: a careless upstream may send anything
                    size += len(piece)
                    if size > MAX_ANSWER_BYTES:
                        raise EmbeddingError("answer too large")
                    parts.append(piece)
                data = b"".join(parts)
    except TimeoutError:
        raise EmbeddingError(f"no answer within {timeout_s:g} s") from None
    except OSError as e:
        raise EmbeddingError(f"unreachable: {type(e).__name__}") from None
    if status != 200:
        raise EmbeddingError(f"status {status}")
    try:
        vector = orjson.loads(data)["data"][0]["embedding"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise EmbeddingError("not an embeddings answer") from None
    if (
        not isinstance(vector, list)
        or not 0 < len(vector) <= MAX_DIM
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vector)
    ):
        raise EmbeddingError("not a vector of finite numbers")
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if not norm > 0 or not math.isfinite(norm):
        raise EmbeddingError("a zero vector")
    return v / norm
