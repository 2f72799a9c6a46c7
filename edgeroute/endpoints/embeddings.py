"""`POST /v1/embeddings`: OpenAI's embeddings API, routed like chat.

Input: a string, a list of strings, a token list or a list of token lists (up to 2048
inputs). Served by OpenAI, Azure and OpenAI-compatible deployments as is (only `model`
rewritten), by Gemini deployments translated (`batchEmbedContents`; text inputs only) and
by Bedrock's Titan and Cohere embeddings (`embeddings_bedrock`). Usage is the upstream's,
or counted with the deployment's tokenizer when it reports none (Gemini, Cohere), and
priced at the deployment's input price.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import struct
from contextvars import ContextVar
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import AttemptRecord, Usage
from edgeroute.cost import underreport
from edgeroute.dispatch import Answer, Failure, JsonAnswer, attempt
from edgeroute.dispatch.attempt import error_in_200
from edgeroute.endpoints.embeddings_bedrock import TITAN_PARALLEL, bedrock_request, one_text_per_call, vectors_of
from edgeroute.endpoints.pipeline import CountedCall, Parsed, bad, json_object, routing_body, serve
from edgeroute.endpoints.upstream import openai_request, speaks_openai, unsupported
from edgeroute.outcome import Outcome
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.bedrock import BedrockAdapter
from edgeroute.providers.gemini import GeminiAdapter
from edgeroute.upstream import DeploymentInfo

log = logging.getLogger("edgeroute.embeddings")

MAX_INPUTS = 2048
# The input one call of a batch split over several calls carries (None: the whole request).
_PIECE: ContextVar[int | None] = ContextVar("embeddings_piece", default=None)
_TOKEN_MAX = 1 << 32  # token ids are non-negative 32-bit integers
_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def _token_list(value: list[Any], where: str) -> list[int]:
    if not value:
        raise bad(f"{where} is an empty token list.", "input")
    for t in value:
        if type(t) is not int or not 0 <= t < _TOKEN_MAX:
            raise bad(f"{where} holds a token that is not a non-negative integer.", "input")
    return value


def inputs_of(raw: Any) -> list[str | list[int]]:
    """The request's inputs, each a string or a token list, checked as OpenAI checks them."""
    if isinstance(raw, str):
        if not raw:
            raise bad("'input' cannot be an empty string.", "input")
        return [raw]
    if not isinstance(raw, list) or not raw:
        raise bad("'input' must be a non-empty string, array of strings, or array of token arrays.", "input")
    if len(raw) > MAX_INPUTS:
        raise bad(f"'input' has {len(raw)} items; at most {MAX_INPUTS} are allowed per request.", "input")
    if all(type(t) is int for t in raw):
        return [_token_list(raw, "'input'")]
    out: list[str | list[int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise bad(f"'input[{i}]' cannot be an empty string.", "input")
            out.append(item)
        elif isinstance(item, list):
            out.append(_token_list(item, f"'input[{i}]'"))
        else:
            raise bad(f"'input[{i}]' must be a string or an array of tokens.", "input")
    return out


# Where an answer's vectors are (OpenAI's, Gemini's, Bedrock's): a 200 with none, and an error, is one.
_VECTOR_KEYS = ("data", "embeddings", "embedding", "embeddingsByType")
_COUNT_ON_LOOP_CHARS = 64 * 1024  # inputs an impossible usage is corrected by counting (past it: estimated)


class EmbeddingsRequest:
    """A checked embeddings request."""

    def __init__(self, body: bytes) -> None:
        req = json_object(body)
        if "input" not in req:
            raise bad("Missing required parameter: 'input'.", "input")
        for name in sorted(set(req) - _FIELDS):
            if req[name] is not None:
                raise bad(f"Unrecognized request argument supplied: {name}", name)
        fmt = req.get("encoding_format")
        if fmt is not None and fmt not in ("float", "base64"):
            raise bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
        dims = req.get("dimensions")
        if dims is not None and (type(dims) is not int or dims < 1):
            raise bad("'dimensions' must be a positive integer.", "dimensions")
        if req.get("user") is not None and not isinstance(req["user"], str):
            raise bad("'user' must be a string.", "user")
        self.model: str = req["model"]
        self.inputs = inputs_of(req["input"])
        self.base64 = fmt == "base64"
        self.dimensions: int | None = dims
        self.body = {k: v for k, v in req.items() if v is not None}

    def text(self) -> str:
        """The text inputs, joined (what rules see); token inputs have none."""
        return "\n".join(x for x in self.inputs if isinstance(x, str))

    def tokens(self, encoding: str) -> int:
        return sum(_tokens_of(x, encoding) for x in self.inputs)


def _tokens_of(item: str | list[int], encoding: str) -> int:
    return len(item) if isinstance(item, list) else _core.Router.count_tokens(item, encoding)


def _gemini_request(adapter: GeminiAdapter, dep: DeploymentInfo, req: EmbeddingsRequest) -> UpstreamRequest:
    if any(isinstance(x, list) for x in req.inputs):
        raise unsupported(dep, "token-array inputs (send text)", "input")
    name = f"models/{dep.model}"
    extra = {"outputDimensionality": req.dimensions} if req.dimensions is not None else {}
    items = [{"model": name, "content": {"parts": [{"text": x}]}, **extra} for x in req.inputs]
    headers = {"Content-Type": "application/json", **adapter.provider.headers}
    if adapter.api_key is not None:
        headers["x-goog-api-key"] = adapter.api_key.reveal()
    url = f"{adapter.provider.base_url}/models/{dep.model}:batchEmbedContents"
    return UpstreamRequest(url, headers, orjson.dumps({"requests": items}))


def _unreadable_vectors(data: list[dict[str, Any]], as_base64: bool) -> str | None:
    """What makes an answer's embeddings (objects, as many as the inputs) not the client's, or
    None: a vector that is null, or not in the encoding asked for (a client's numpy read a string
    as floats), or indices that do not number the inputs once each (a duplicate, `99` of two:
    the client's SDK placed the vectors by them). O(items): a vector's numbers are not read."""
    # Floats for a base64 request are read (the OpenAI SDK asks base64 by default, and servers
    # that ignore it answer floats, which it keeps); a string for a float request is not.
    want = (str, list) if as_base64 else (list,)
    if not all(type(item.get("embedding")) in want for item in data):
        return "embeddings that are not vectors" if as_base64 else "embeddings that are not lists of floats"
    indices = [item["index"] for item in data if "index" in item]  # none given: placed in order
    if not all(type(i) is int and 0 <= i < len(data) for i in indices) or len(set(indices)) != len(indices):
        return "embedding indices that do not number the inputs once each"
    return None


def _encoded(values: list[float], as_base64: bool) -> Any:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode() if as_base64 else values


class EmbeddingsCall(CountedCall):
    """Dispatch of one embeddings request: the chat loop, with this endpoint's request and answer."""

    def __init__(self, req: EmbeddingsRequest, *args: Any) -> None:
        super().__init__(req, *args)
        self.req = req

    def _inputs(self) -> list[str | list[int]]:
        piece = _PIECE.get()
        return self.req.inputs if piece is None else [self.req.inputs[piece]]

    async def attempt(self, dep: DeploymentInfo, kind: str = "first") -> Answer | Failure:
        adapter = self.live.upstreams[dep.provider].adapter
        n = len(self.req.inputs)
        if n == 1 or not isinstance(adapter, BedrockAdapter) or not one_text_per_call(dep):
            return await super().attempt(dep, kind)
        if any(not isinstance(x, str) for x in self.req.inputs):
            raise unsupported(dep, "token-array inputs (send text)", "input")
        self._prepared = None  # the whole batch's, built to find that it reads them: each call builds its own
        return await self._split_attempt(dep, kind, n)

    async def _split_attempt(self, dep: DeploymentInfo, kind: str, n: int) -> Answer | Failure:
        """One attempt at a deployment that embeds one text per call: a call per input, merged."""
        known = {id(r) for r in self.record.attempts}
        gate = asyncio.Semaphore(TITAN_PARALLEL)
        failed: list[Failure] = []
        size = 0  # of the answers held: together bounded as one answer is (each call's alone was)

        async def piece(i: int) -> Answer | Failure | None:
            nonlocal size
            async with gate:
                if failed:  # the attempt has failed already: send no more
                    return None
                _PIECE.set(i)
                got = await super(EmbeddingsCall, self).attempt(dep, kind)
                if isinstance(got, JsonAnswer):
                    size += len(got.body)
                    if size > attempt.MAX_ANSWER_BYTES:
                        mib = attempt.MAX_ANSWER_BYTES >> 20
                        got = Failure(Outcome.SERVER_ERROR, 200, f"the upstream's answers are larger than {mib} MiB")
                if isinstance(got, Failure):
                    failed.append(got)
                return got

        results = await asyncio.gather(*(piece(i) for i in range(n)))
        mine = [r for r in self.record.attempts if id(r) not in known and r.deployment == dep.name]
        answers = [r for r in results if isinstance(r, JsonAnswer)]
        # Every call priced (a failed attempt's too: those given up on after they were sent).
        used = [r.usage for r in mine if r.usage is not None]
        usage = Usage(prompt_tokens=sum(u.prompt_tokens for u in used), estimated=any(u.estimated for u in used))
        self._merge_records(mine, failed[0] if failed else None, usage)
        if failed:
            return failed[0]
        vectors = [orjson.loads(a.body)["data"][0]["embedding"] for a in answers]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        total = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
        body = {"object": "list", "data": data, "model": self.req.model, "usage": total}
        return JsonAnswer(orjson.dumps(body), usage)

    def _merge_records(self, mine: list[AttemptRecord], failure: Failure | None, usage: Usage) -> None:
        """The calls of one split attempt as one attempt record: summed usage and cost, the
        longest latency, the failure's outcome if one failed."""
        if not mine:
            return
        merged = dataclasses.replace(
            mine[0],
            outcome=failure.outcome.value if failure is not None else "success",
            status=failure.status if failure is not None else mine[0].status,
            error=failure.message if failure is not None else None,
            latency_ms=max(r.latency_ms for r in mine),
            usage=usage,
            cost_usd=sum(r.cost_usd for r in mine),
        )
        at = self.record.attempts.index(mine[0])
        drop = {id(r) for r in mine}
        self.record.attempts[:] = [r for r in self.record.attempts if id(r) not in drop]
        self.record.attempts.insert(at, merged)

    def prompt_tokens(self) -> int:
        """The prompt of one call of a split attempt is its own text: a call given up on was
        priced at the whole batch's, eight calls in flight at eight times the batch."""
        piece = _PIECE.get()
        return super().prompt_tokens() if piece is None else _tokens_of(self.req.inputs[piece], self.decision.encoding)

    def upstream_request(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        if speaks_openai(adapter):
            return openai_request(adapter, dep, "/embeddings", self.req.body, False)
        if isinstance(adapter, GeminiAdapter):
            return _gemini_request(adapter, dep, self.req)
        if isinstance(adapter, BedrockAdapter):
            inputs = self._inputs()
            if len(inputs) > 1 and one_text_per_call(dep) and all(isinstance(x, str) for x in inputs):
                inputs = inputs[:1]  # sent one call per text (`attempt`): each reads as the first does
            return bedrock_request(adapter, dep, inputs, self.req.dimensions)
        raise unsupported(dep, "embeddings")

    def _json_answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return Failure(Outcome.SERVER_ERROR, status, "upstream sent malformed JSON")
        if isinstance(obj, dict) and (failed := error_in_200(adapter, obj, status, _VECTOR_KEYS)) is not None:
            return failed  # as chat's: a client error the client's, not every deployment's failure
        reported: int | None = None
        if isinstance(adapter, GeminiAdapter) and isinstance(obj, dict) and isinstance(obj.get("embeddings"), list):
            obj = self._from_gemini(obj["embeddings"])
            if obj is None:
                return Failure(Outcome.SERVER_ERROR, status, "upstream sent embeddings without values")
        elif isinstance(adapter, BedrockAdapter) and isinstance(obj, dict):
            got = vectors_of(obj)
            if got is None:
                return Failure(Outcome.SERVER_ERROR, status, "upstream sent embeddings without values")
            obj, reported = self._listed(got[0]), got[1]
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
            return Failure(Outcome.SERVER_ERROR, status, "upstream answer has no embeddings")
        if not all(isinstance(item, dict) for item in obj["data"]):  # `[null]` crashed the OpenAI SDK on a 200
            return Failure(Outcome.SERVER_ERROR, status, "upstream answer has embeddings that are not objects")
        if len(obj["data"]) != len(self._inputs()):
            return Failure(Outcome.SERVER_ERROR, status, "upstream answered a different number of embeddings")
        if (unreadable := _unreadable_vectors(obj["data"], self.req.base64)) is not None:
            return Failure(Outcome.SERVER_ERROR, status, f"upstream answer has {unreadable}")
        usage = Usage.from_openai(obj.get("usage"))
        if usage is None and reported:  # Titan's own count (of none: garbage, for an input is never empty)
            usage = Usage(prompt_tokens=reported)
            obj["usage"] = {"prompt_tokens": reported, "total_tokens": reported}
        if usage is None:
            usage = Usage(prompt_tokens=self.prompt_tokens(), estimated=True)
            obj["usage"] = {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}
        elif self._impossible(usage.prompt_tokens):
            usage = self._counted(usage, f"provider {adapter.name}")
        obj["model"] = self.req.model
        return JsonAnswer(orjson.dumps(obj), usage)

    def _impossible(self, reported: int) -> bool:
        """Whether the inputs cannot be `reported` tokens: fewer than their token ids, or than
        their text's bytes can be at `underreport.MAX_BYTES_PER_TOKEN` a token."""
        inputs = self._inputs()
        ids = sum(len(x) for x in inputs if isinstance(x, list))
        text = sum(len(x.encode("utf-8", "surrogatepass")) for x in inputs if isinstance(x, str))
        return reported < ids or underreport.impossible(reported - ids, text)

    def _counted(self, usage: Usage, source: str) -> Usage:
        """The inputs counted, charged in place of an impossible report (as a chat answer's
        output is: `upstream_underreported_usage`): ten 100-token texts reported as 1 token."""
        inputs = self._inputs()
        text = sum(len(x) for x in inputs if isinstance(x, str))
        if text <= _COUNT_ON_LOOP_CHARS:
            counted = sum(_tokens_of(x, self.decision.encoding) for x in inputs)
        else:  # megabytes of text are not counted on the event loop: the core's estimate of it
            ids = sum(len(x) for x in inputs if isinstance(x, list))
            counted = ids + text // underreport.ESTIMATE_BYTES_PER_TOKEN
        if counted <= usage.prompt_tokens:
            return usage
        log.warning("%s: reported %d prompt tokens for inputs counted at %d", source, usage.prompt_tokens, counted)
        self.record.error_class = underreport.CODE
        return Usage(prompt_tokens=counted, estimated=True)

    def _from_gemini(self, embeddings: list[Any]) -> dict[str, Any] | None:
        vectors = []
        for e in embeddings:
            values = e.get("values") if isinstance(e, dict) else None
            if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
                return None
            vectors.append([float(v) for v in values])
        return self._listed(vectors)

    def _listed(self, vectors: list[list[float]]) -> dict[str, Any]:
        """Vectors as OpenAI's list of embeddings, encoded as the client asked."""
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, self.req.base64)}
            for i, v in enumerate(vectors)
        ]
        return {"object": "list", "data": data, "model": self.req.model}


def parse(body: bytes) -> Parsed:
    req = EmbeddingsRequest(body)
    # The vectors depend on the inputs, their size and encoding; `user` does not change them.
    fields = {"endpoint": "embeddings", "input": req.inputs, "dimensions": req.dimensions, "base64": req.base64}
    body_for_rules = routing_body(req.model, req.text(), max_tokens=1)
    ids = sum(len(x) for x in req.inputs if isinstance(x, list))
    count = req.tokens if ids and any(isinstance(x, str) for x in req.inputs) else None  # text and ids: both
    make = partial(EmbeddingsCall, req)
    return Parsed(req.model, body_for_rules, False, make, cache_fields=fields, token_ids=ids, count=count)


async def handle(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse)
