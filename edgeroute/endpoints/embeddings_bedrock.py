"""`/v1/embeddings` at Bedrock: Titan Text Embeddings and Cohere Embed over InvokeModel.

Titan (`amazon.titan-embed-text-v1`, `-v2:0`) embeds one text per call and reports its
tokens (`inputTextTokenCount`); v2 takes `dimensions` 256, 512 or 1024. A batch for Titan
is sent as one call per text, `TITAN_PARALLEL` at a time, and answered as one list (one
attempt in the record, its usage and cost the sum of the calls'; a failed call fails the
attempt, and what the calls before it cost is kept). Cohere
(`cohere.embed-english-v3`, `-multilingual-v3`, `-v4:0`) embeds up to 96 texts per call
with an `input_type` (the provider option `embedding_input_type`, default
`search_document`); v4 takes `dimensions` as `output_dimension`. Cohere reports no token
count in the body, so its usage is counted with the deployment's tokenizer (estimated).
Cross-region ids (`us.`, `eu.`, `apac.`, `global.`) name the same models.
"""

from __future__ import annotations

from typing import Any

import orjson

from edgeroute.endpoints.upstream import unsupported
from edgeroute.errors import ProxyError
from edgeroute.providers.base import UpstreamRequest
from edgeroute.providers.bedrock import BedrockAdapter
from edgeroute.upstream import DeploymentInfo

TITAN_DIMENSIONS = (256, 512, 1024)
TITAN_PARALLEL = 8  # calls in flight for one batch: a 2048-input batch must not open 2048 connections
COHERE_DIMENSIONS = (256, 512, 1024, 1536)
COHERE_MAX_TEXTS = 96
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
_REGION_PREFIXES = ("us", "eu", "apac", "global", "jp", "au", "ca")


def family(model: str) -> str | None:
    """`titan`, `titan-v2`, `cohere`, `cohere-v4`, or None for a model this endpoint cannot serve."""
    head, _, rest = model.partition(".")
    base = rest if head in _REGION_PREFIXES and rest else model
    if base.startswith("amazon.titan-embed-text"):
        return "titan-v2" if "-v2" in base else "titan"
    if base.startswith("cohere.embed"):
        return "cohere-v4" if "-v4" in base else "cohere"
    return None


def _dims_error(dep: DeploymentInfo, allowed: tuple[int, ...]) -> ProxyError:
    takes = f"takes 'dimensions' of {', '.join(map(str, allowed))} only" if allowed else "does not take 'dimensions'"
    return ProxyError(
        400, f"The deployment `{dep.name}` (model `{dep.model}`) {takes}.", code="invalid_request", param="dimensions"
    )


def bedrock_request(
    adapter: BedrockAdapter, dep: DeploymentInfo, inputs: list[str | list[int]], dimensions: int | None
) -> UpstreamRequest:
    """The InvokeModel request for `inputs` at `dep` (a 400 naming the deployment for what it cannot take)."""
    kind = family(dep.model)
    if kind is None:
        raise unsupported(dep, f"embeddings with model `{dep.model}` (Bedrock: Titan or Cohere embeddings only)")
    if any(not isinstance(x, str) for x in inputs):
        raise unsupported(dep, "token-array inputs (send text)", "input")
    texts: list[str] = [x for x in inputs if isinstance(x, str)]
    body: dict[str, Any]
    if kind.startswith("titan"):
        if len(texts) != 1:  # EmbeddingsCall splits a batch into one call per text before this
            raise unsupported(dep, f"{len(texts)} inputs in one call (Titan embeds one text per call)", "input")
        body = {"inputText": texts[0]}
        if dimensions is not None:
            if kind != "titan-v2" or dimensions not in TITAN_DIMENSIONS:
                raise _dims_error(dep, TITAN_DIMENSIONS if kind == "titan-v2" else ())
            body["dimensions"] = dimensions
    else:
        if len(texts) > COHERE_MAX_TEXTS:
            raise unsupported(dep, f"more than {COHERE_MAX_TEXTS} inputs in one request", "input")
        input_type = str(adapter.provider.options.get("embedding_input_type", "search_document"))
        body = {"texts": texts, "input_type": input_type, "truncate": "NONE"}
        if dimensions is not None:
            if kind != "cohere-v4" or dimensions not in COHERE_DIMENSIONS:
                raise _dims_error(dep, COHERE_DIMENSIONS if kind == "cohere-v4" else ())
            body["output_dimension"] = dimensions
    return adapter.model_request(dep.model, "invoke", orjson.dumps(body))


def one_text_per_call(dep: DeploymentInfo) -> bool:
    return (family(dep.model) or "").startswith("titan")


def vectors_of(obj: dict[str, Any]) -> tuple[list[list[float]], int | None] | None:
    """The answer's vectors and, for Titan, its token count; None for an answer without them."""
    if "embedding" in obj:  # Titan: one vector
        raw: Any = [obj["embedding"]]
        count = obj.get("inputTextTokenCount")
        # A count as every usage is read (0 to 2^40): past it, the texts are counted (10^15
        # a text priced two texts at two billion USD; past 64 bits no ledger could store it).
        tokens = count if type(count) is int and 0 <= count < 1 << 40 else None
    else:  # Cohere: a list of vectors, or {"float": [...]} when asked by type
        raw = obj.get("embeddings")
        raw = raw.get("float") if isinstance(raw, dict) else raw
        tokens = None
    if not isinstance(raw, list) or not raw:
        return None
    out: list[list[float]] = []
    for vec in raw:
        if not isinstance(vec, list) or not vec or not all(type(v) in (int, float) for v in vec):
            return None
        out.append([float(v) for v in vec])
    return out, tokens
