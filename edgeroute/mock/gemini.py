"""A mock of Google's Gemini API (v1beta `generateContent` / `streamGenerateContent`).

Answers `POST /v1beta/models/{model}:generateContent` and
`:streamGenerateContent?alt=sse` with Gemini's JSON (candidates, parts,
functionCall, finishReason, promptFeedback, usageMetadata incl.
cachedContentTokenCount) and Google's error bodies (`{"error": {"code", "message",
"status"}}`, RESOURCE_EXHAUSTED with RetryInfo). Writes the same reply as the OpenAI
mock for the same conversation.

Per-request headers as in the OpenAI mock, plus ``x-mock-safety``: `prompt` blocks
the prompt (no candidates), `answer` stops the answer with finishReason SAFETY.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edgeroute.mock import openai as openai_mock
from edgeroute.mock import openai_endpoints
from edgeroute.mock.unreadable import refused_as

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_ids = itertools.count(1)


@dataclass
class MockOptions(openai_mock.MockOptions):
    name: str = "mock-gemini"
    cached_tokens: int = 0
    thoughts_tokens: int = 0


def google_error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    err: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if retry_after is not None:
        err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}]
    return web.Response(status=status, body=orjson.dumps({"error": err}), content_type="application/json")


def _field(obj: dict[str, Any], camel: str) -> Any:
    """A field by its JSON name or its proto name (Google's JSON parser accepts both)."""
    if camel in obj:
        return obj[camel]
    return obj.get("".join("_" + c.lower() if c.isupper() else c for c in camel))


def _text(parts: Any) -> str:
    return " ".join(str(p["text"]) for p in parts or () if isinstance(p, dict) and "text" in p)


def _as_openai(model: str, body: dict[str, Any]) -> dict[str, Any]:
    msgs = [{"role": c.get("role", "user"), "content": _text(c.get("parts"))} for c in body["contents"]]
    return {"model": model, "messages": msgs}


def _prompt_tokens(body: dict[str, Any]) -> int:
    system = _text((_field(body, "systemInstruction") or {}).get("parts"))
    n = len(body["contents"]) + (1 if system else 0)
    return 3 + 4 * n + len(system.split()) + sum(len(_text(c.get("parts")).split()) for c in body["contents"])


def _args(schema: dict[str, Any] | None) -> dict[str, Any]:
    props = (schema or {}).get("properties") or {}
    return {k: ("Paris" if v.get("type") in ("string", "STRING") else 1) for k, v in props.items()}


def _function_call(body: dict[str, Any]) -> dict[str, Any] | None:
    decls = [d for t in body.get("tools") or () for d in _field(t, "functionDeclarations") or ()]
    cfg = _field(_field(body, "toolConfig") or {}, "functionCallingConfig") or {}
    if not decls or cfg.get("mode") == "NONE":
        return None
    if any(_field(p, "functionResponse") for c in body["contents"] for p in c.get("parts") or ()):
        return None
    allowed = _field(cfg, "allowedFunctionNames")
    decl = next((d for d in decls if not allowed or d.get("name") in allowed), decls[0])
    schema = _field(decl, "parametersJsonSchema") or decl.get("parameters")
    return {"name": decl.get("name"), "args": _args(schema)}


def _usage(opts: MockOptions, prompt: int, output: int) -> dict[str, Any]:
    u: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output + opts.thoughts_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if opts.cached_tokens:
        u["cachedContentTokenCount"] = min(opts.cached_tokens, prompt)
    if opts.thoughts_tokens:
        u["thoughtsTokenCount"] = opts.thoughts_tokens
    return u


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


async def generate(request: web.Request) -> web.StreamResponse:
    opts: MockOptions = request.app[OPTIONS]
    model, _, method = request.match_info["target"].rpartition(":")
    if method == "batchEmbedContents" and model:
        return await embed(request, model)
    if method not in ("generateContent", "streamGenerateContent") or not model:
        return google_error(404, f"Method {method!r} is not found.")
    key = request.headers.get("x-goog-api-key") or request.query.get("key")
    if opts.api_key is not None and key != opts.api_key:
        return google_error(400, "API key not valid. Please pass a valid API key.")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return google_error(400, "Invalid JSON payload received.")
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
        return google_error(400, "* GenerateContentRequest.contents: contents is not specified")
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body, "model": model, "method": method})
    if opts.models is not None and model not in opts.models:
        return google_error(404, f"models/{model} is not found for API version v1beta.")
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        message = "The model is overloaded. Please try again later." if status == 503 else f"Mock error {status}."
        return google_error(status, message, request.headers.get("x-mock-retry-after"))

    gen = _field(body, "generationConfig") or {}
    prompt = _prompt_tokens(body)
    call = _function_call(body)
    text: str | None = None
    if call is None and _field(gen, "responseMimeType") == "application/json":
        text = orjson.dumps(_args(_field(gen, "responseJsonSchema") or _field(gen, "responseSchema"))).decode()
    elif call is None:
        text = openai_mock.reply_text(_as_openai(model, body), opts, request.headers.get("x-mock-content"))
    pieces = text.split(" ") if text is not None else []
    finish = "STOP"
    max_out = _field(gen, "maxOutputTokens")
    if max_out is not None and call is None and max_out < len(pieces):
        pieces, finish = pieces[:max_out], "MAX_TOKENS"
    output = 12 if call else len(pieces)
    safety = request.headers.get("x-mock-safety")
    answers: list[dict[str, Any]]
    base = {"modelVersion": model, "responseId": f"mockresp{next(_ids)}"}
    ratings: list[dict[str, Any]] = [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
    ]

    def candidate(parts: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
        c: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if reason:
            c["finishReason"] = reason
        return c

    if safety == "prompt":
        blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": ratings}}
        usage = {"promptTokenCount": prompt, "totalTokenCount": prompt}
        answers = [{**blocked, "usageMetadata": usage, **base}]
    elif safety == "answer":
        cand = {"index": 0, "finishReason": "SAFETY", "safetyRatings": ratings}
        answers = [{"candidates": [cand], "usageMetadata": _usage(opts, prompt, 0), **base}]
    elif call is not None:
        answers = [{"candidates": [candidate([{"functionCall": call}], finish)], **base}]
    elif method == "generateContent":
        answers = [{"candidates": [candidate([{"text": " ".join(pieces)}], finish)], **base}]
    else:
        answers = [
            {"candidates": [candidate([{"text": p if i == 0 else " " + p}], None)], **base}
            for i, p in enumerate(pieces)
        ]
        answers[-1]["candidates"][0]["finishReason"] = finish
    if "usageMetadata" not in answers[-1]:
        answers[-1]["usageMetadata"] = _usage(opts, prompt, output)

    if method == "generateContent":
        return web.Response(body=orjson.dumps(answers[0]), content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i, a in enumerate(answers):
        if opts.chunk_interval and i:
            await asyncio.sleep(opts.chunk_interval)
        await resp.write(_sse(a))
    await resp.write_eof()
    return resp


async def embed(request: web.Request, model: str) -> web.Response:
    """`models/{model}:batchEmbedContents`: one vector per request, no token usage (as Gemini)."""
    opts: MockOptions = request.app[OPTIONS]
    if opts.api_key is not None and request.headers.get("x-goog-api-key") != opts.api_key:
        return google_error(400, "API key not valid. Please pass a valid API key.")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return google_error(400, "Invalid JSON payload received.")
    items = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        return google_error(400, "* BatchEmbedContentsRequest.requests: requests is not specified")
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body, "model": model, "method": "embed"})
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        return google_error(status, f"Mock error {status}.")
    out = []
    for item in items:
        if not isinstance(item, dict) or item.get("model") != f"models/{model}":
            return google_error(400, "* BatchEmbedContentsRequest.model: each request's model must match the batch's")
        text = _text((item.get("content") or {}).get("parts"))
        dims = _field(item, "outputDimensionality") or 8
        if not isinstance(dims, int) or not 1 <= dims <= openai_endpoints.MAX_DIMENSIONS:
            return google_error(400, "* BatchEmbedContentsRequest.requests[0].output_dimensionality: out of range")
        out.append({"values": openai_endpoints.vector(text, dims)})
    return web.Response(body=orjson.dumps({"embeddings": out}), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    opts: MockOptions = request.app[OPTIONS]
    names = opts.models or ["gemini-2.5-flash", "gemini-2.5-pro"]
    data = [{"name": f"models/{m}", "displayName": m, "supportedGenerationMethods": ["generateContent"]} for m in names]
    return web.Response(body=orjson.dumps({"models": data}), content_type="application/json")


OPTIONS = web.AppKey("gemini_options", MockOptions)


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (`/v1beta/models/{model}:{method}`)."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[refused_as(lambda m: google_error(400, m))])
    app[OPTIONS] = options or MockOptions()
    app.router.add_post("/v1beta/models/{target}", generate)
    app.router.add_get("/v1beta/models", list_models)
    return app
