"""A mock of AWS Bedrock Runtime's Converse API, faithful to its wire format.

Answers `POST /model/{modelId}/converse` (JSON: output.message.content, stopReason,
usage with cacheReadInputTokens, metrics) and `/converse-stream` (AWS's binary
event-stream: messageStart, contentBlockStart for tool use, contentBlockDelta,
contentBlockStop, messageStop, metadata; exceptions as exception frames). Errors as
AWS sends them: the status, an `x-amzn-ErrorType` header and `{"message": ...}`.
When `aws_secret_access_key` is set, every request's SigV4 signature is checked
(403 InvalidSignatureException otherwise). Writes the same reply as the OpenAI mock
for the same conversation.

Per-request headers as in the OpenAI mock, plus ``x-mock-stream-error``: a stream
that fails with a `throttlingException` frame before any content.

`POST /model/{modelId}/invoke` answers the embeddings models as InvokeModel does: Titan
Text Embeddings (`{"inputText"}` → `{"embedding", "inputTextTokenCount"}`; v2 takes
`dimensions` 256/512/1024) and Cohere Embed (`{"texts", "input_type"}`, at most 96 texts →
`{"id", "embeddings", "texts", "response_type"}`), with the `X-Amzn-Bedrock-Input-Token-Count`
header; deterministic vectors, as the OpenAI mock's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from edgeroute.mock import openai as openai_mock
from edgeroute.mock.openai_endpoints import vector
from edgeroute.mock.unreadable import refused_as

_ERRORS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}

_ids = itertools.count(1)


@dataclass
class MockOptions(openai_mock.MockOptions):
    name: str = "mock-bedrock"
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # When set, requests must carry a valid SigV4 signature made with this secret.
    aws_secret_access_key: str | None = None


def aws_error(status: int, message: str, etype: str | None = None) -> web.Response:
    etype = etype or _ERRORS.get(status, "InternalServerException")
    headers = {"x-amzn-ErrorType": f"{etype}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    return web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json", headers=headers
    )


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message (string headers only), with both CRCs."""
    hb = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        hb += struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v
    total = 12 + len(hb) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hb))
    msg = prelude + struct.pack(">I", zlib.crc32(prelude)) + hb + payload
    return msg + struct.pack(">I", zlib.crc32(msg))


def event_frame(event_type: str, obj: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_frame(headers, orjson.dumps({**obj, "p": "abcdef"}))


def exception_frame(exception_type: str, message: str) -> bytes:
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_frame(headers, orjson.dumps({"message": message}))


def _signature_ok(request: web.Request, body: bytes, secret: str) -> bool:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return False
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 ") :].split(",") if "=" in p)
    try:
        akid, _date, region, service, _ = fields["Credential"].split("/")
        signed = fields["SignedHeaders"].split(";")
        stamp = request.headers["X-Amz-Date"]
    except (KeyError, ValueError):
        return False
    headers = {h: request.headers.get(h, "") for h in signed if h != "host"}
    req = AWSRequest(method=request.method, url=f"http://{request.host}{request.raw_path}", data=body, headers=headers)
    req.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(akid, secret, request.headers.get("X-Amz-Security-Token")), service, region)
    expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
    return bool(expected == fields.get("Signature"))


def _text(content: Any) -> str:
    return " ".join(str(b["text"]) for b in content or () if isinstance(b, dict) and "text" in b)


def _prompt_tokens(body: dict[str, Any]) -> int:
    system = _text(body.get("system"))
    n = len(body["messages"]) + (1 if system else 0)
    return 3 + 4 * n + len(system.split()) + sum(len(_text(m.get("content")).split()) for m in body["messages"])


def _tool_use(body: dict[str, Any]) -> dict[str, Any] | None:
    cfg = body.get("toolConfig") or {}
    tools = [t["toolSpec"] for t in cfg.get("tools") or () if "toolSpec" in t]
    if not tools:
        return None
    if any("toolResult" in b for m in body["messages"] for b in m.get("content") or ()):
        return None
    forced = (cfg.get("toolChoice") or {}).get("tool", {}).get("name")
    spec = next((t for t in tools if t.get("name") == forced), tools[0])
    props = ((spec.get("inputSchema") or {}).get("json") or {}).get("properties") or {}
    args = {k: ("Paris" if v.get("type") == "string" else 1) for k, v in props.items()}
    return {"toolUseId": f"tooluse_mock{next(_ids):06d}", "name": spec.get("name"), "input": args}


def _usage(opts: MockOptions, prompt: int, output: int) -> dict[str, Any]:
    cached = min(opts.cached_tokens, prompt)
    written = min(opts.cache_write_tokens, prompt - cached)
    u: dict[str, Any] = {
        "inputTokens": prompt - cached - written,
        "outputTokens": output,
        "totalTokens": prompt + output,
    }
    if cached or written:
        u["cacheReadInputTokens"] = cached
        u["cacheWriteInputTokens"] = written
    return u


def _validate(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return "A conversation must start with a user message."
    for m in body["messages"]:
        for b in m.get("content") or ():
            src = (b.get("image") or {}).get("source") if isinstance(b, dict) else None
            if src is not None:
                try:
                    base64.b64decode(src.get("bytes", ""), validate=True)
                except (binascii.Error, ValueError):
                    return "Invalid image bytes."
    return None


async def converse(request: web.Request) -> web.StreamResponse:
    opts: MockOptions = request.app[OPTIONS]
    stream = request.match_info["action"] == "converse-stream"
    raw = await request.read()
    if opts.aws_secret_access_key is not None and not _signature_ok(request, raw, opts.aws_secret_access_key):
        msg = "The request signature we calculated does not match the signature you provided."
        return aws_error(403, msg, "InvalidSignatureException")
    if opts.api_key is not None and request.headers.get("Authorization") != f"Bearer {opts.api_key}":
        return aws_error(403, "Authentication failed: invalid API key.", "AccessDeniedException")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return aws_error(400, "Malformed input request, please reformat your input and try again.")
    problem = _validate(body)
    if problem:
        return aws_error(400, problem)
    model = request.match_info["model"]
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body, "model": model})
    if opts.models is not None and model not in opts.models:
        return aws_error(404, "The provided model identifier is invalid.")
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        message = "Too many requests, please wait before trying again." if status == 429 else f"Mock error {status}."
        resp = aws_error(status, message)
        if "x-mock-retry-after" in request.headers:
            resp.headers["retry-after"] = request.headers["x-mock-retry-after"]
        return resp

    prompt = _prompt_tokens(body)
    call = _tool_use(body)
    msgs = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body["messages"]]
    text = (
        None
        if call
        else openai_mock.reply_text({"model": model, "messages": msgs}, opts, request.headers.get("x-mock-content"))
    )
    pieces = text.split(" ") if text is not None else []
    stop_reason = "tool_use" if call else "end_turn"
    max_tokens = (body.get("inferenceConfig") or {}).get("maxTokens")
    if max_tokens is not None and call is None and max_tokens < len(pieces):
        pieces, stop_reason = pieces[:max_tokens], "max_tokens"
    output = 12 if call else len(pieces)
    usage = _usage(opts, prompt, output)

    if not stream:
        content = [{"toolUse": call}] if call else [{"text": " ".join(pieces)}]
        answer = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": stop_reason,
            "usage": usage,
            "metrics": {"latencyMs": 12},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    out = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
    await out.prepare(request)
    await out.write(event_frame("messageStart", {"role": "assistant"}))
    if "x-mock-stream-error" in request.headers:
        await out.write(exception_frame("throttlingException", "Too many requests, please wait before trying again."))
        await out.write_eof()
        return out
    if call:
        start = {"toolUse": {"toolUseId": call["toolUseId"], "name": call["name"]}}
        await out.write(event_frame("contentBlockStart", {"contentBlockIndex": 0, "start": start}))
        args = orjson.dumps(call["input"]).decode()
        for i in range(0, len(args), 8):
            if opts.chunk_interval:
                await asyncio.sleep(opts.chunk_interval)
            delta = {"toolUse": {"input": args[i : i + 8]}}
            await out.write(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}))
    else:
        for i, piece in enumerate(pieces):
            if opts.chunk_interval:
                await asyncio.sleep(opts.chunk_interval)
            text_delta = {"text": piece if i == 0 else " " + piece}
            await out.write(event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": text_delta}))
    await out.write(event_frame("contentBlockStop", {"contentBlockIndex": 0}))
    await out.write(event_frame("messageStop", {"stopReason": stop_reason}))
    await out.write(event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 12}}))
    await out.write_eof()
    return out


OPTIONS = web.AppKey("bedrock_options", MockOptions)

_TITAN_DIMS = (256, 512, 1024)
_COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
_MOCK_DIMS = 8  # the models' real sizes (1024 and up) only make the tests slower


def _titan(model: str, body: dict[str, Any]) -> tuple[dict[str, Any], int] | str:
    text = body.get("inputText")
    if not isinstance(text, str) or not text:
        return "Malformed input request: #: required key [inputText] not found"
    extra = set(body) - {"inputText", "dimensions", "normalize", "embeddingTypes"}
    if "v2" not in model:
        extra |= set(body) & {"dimensions", "normalize", "embeddingTypes"}
    if extra:
        return f"Malformed input request: #: extraneous key [{sorted(extra)[0]}] is not permitted"
    dims = body.get("dimensions", 1024)
    if dims not in _TITAN_DIMS:
        return f"Malformed input request: #/dimensions: {dims} is not a valid enum value"
    tokens = max(1, len(text.split()))
    return {"embedding": vector(text, _MOCK_DIMS), "inputTextTokenCount": tokens}, tokens


def _cohere(model: str, body: dict[str, Any]) -> tuple[dict[str, Any], int] | str:
    texts = body.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        return "Malformed input request: #/texts: expected a non-empty array of non-empty strings"
    if len(texts) > 96:
        return f"Malformed input request: #/texts: expected maximum item count: 96, found: {len(texts)}"
    if body.get("input_type") not in _COHERE_INPUT_TYPES:
        return "Malformed input request: #: required key [input_type] not found or not valid"
    extra = set(body) - {"texts", "input_type", "truncate", "embedding_types", "output_dimension", "images"}
    if "v4" not in model and "output_dimension" in body:
        extra.add("output_dimension")
    if extra:
        return f"Malformed input request: #: extraneous key [{sorted(extra)[0]}] is not permitted"
    vectors = [vector(t, _MOCK_DIMS) for t in texts]
    kinds = body.get("embedding_types")
    out: dict[str, Any] = {"id": f"emb-mock-{next(_ids):06d}", "texts": texts}
    if kinds:  # asked by type: a mapping of type → vectors
        out.update(embeddings={"float": vectors}, response_type="embeddings_by_type")
    else:
        out.update(embeddings=vectors, response_type="embeddings_floats")
    return out, sum(max(1, len(t.split())) for t in texts)


async def invoke(request: web.Request) -> web.Response:
    """InvokeModel for the embeddings models (Titan, Cohere)."""
    opts: MockOptions = request.app[OPTIONS]
    raw = await request.read()
    if opts.aws_secret_access_key is not None and not _signature_ok(request, raw, opts.aws_secret_access_key):
        msg = "The request signature we calculated does not match the signature you provided."
        return aws_error(403, msg, "InvalidSignatureException")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return aws_error(400, "Malformed input request, please reformat your input and try again.")
    model = request.match_info["model"]
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body, "model": model, "method": "invoke"})
    if opts.models is not None and model not in opts.models:
        return aws_error(404, "The provided model identifier is invalid.")
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        return aws_error(status, f"Mock error {status}.")
    family = model.split(".", 1)[1] if model.split(".", 1)[0] in ("us", "eu", "apac", "global") else model
    if not isinstance(body, dict):
        return aws_error(400, "Malformed input request, please reformat your input and try again.")
    if family.startswith("amazon.titan-embed-text"):
        got = _titan(family, body)
    elif family.startswith("cohere.embed"):
        got = _cohere(family, body)
    else:
        return aws_error(400, "The provided model doesn't support on-demand throughput for this operation.")
    if isinstance(got, str):
        return aws_error(400, got)
    answer, tokens = got
    return web.Response(
        body=orjson.dumps(answer),
        content_type="application/json",
        headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens), "X-Amzn-Bedrock-Invocation-Latency": "12"},
    )


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (`/model/{modelId}/converse[-stream]`)."""
    app = web.Application(
        client_max_size=64 * 1024 * 1024, middlewares=[refused_as(lambda m: aws_error(400, m, "ValidationException"))]
    )
    app[OPTIONS] = options or MockOptions()
    app.router.add_post("/model/{model}/{action:converse|converse-stream}", converse)
    app.router.add_post("/model/{model}/invoke", invoke)
    return app
