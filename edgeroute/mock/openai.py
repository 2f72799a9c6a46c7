"""A mock of OpenAI's Chat Completions API, faithful to its wire format.

Answers `POST /v1/chat/completions` (JSON or SSE stream, with `usage`,
`stream_options.include_usage`, tool calls) and `GET /v1/models`, and OpenAI's error
bodies for bad input, a wrong key or an unknown model. Behaviour a test wants to
provoke is set per server (:class:`MockOptions`) or per request with headers:

- ``x-mock-latency-ms``: wait before answering;
- ``x-mock-status`` (and ``x-mock-retry-after``): answer that error status instead;
- ``x-mock-content``: the assistant's reply text.

A request asking for audio (`modalities: ["text", "audio"]`) is answered with spoken audio
kept under an id (`message.audio`, a stream's `delta.audio`); a later request naming that id
in an assistant message (`"audio": {"id": ...}`) is answered with what the audio said, as a
model hearing it again would; an id the mock never gave is OpenAI's 400. Its usage counts the
audio as OpenAI's does: a spoken answer's clip (`audio_tokens_per_word` a word of its
transcript) among its completion tokens (`completion_tokens_details.audio_tokens`), and the
clip again among the prompt tokens (`prompt_tokens_details.audio_tokens`) each time a
request names it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from edgeroute.mock import openai_endpoints
from edgeroute.mock.unreadable import refused_as

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}

_ids = itertools.count(1)


@dataclass
class MockOptions:
    """How the mock behaves for every request."""

    api_key: str | None = None
    models: list[str] | None = None  # None: accept any model
    latency_ms: float = 0.0
    # Pause between stream chunks, in seconds.
    chunk_interval: float = 0.0
    # Words in a default reply.
    reply_words: int = 12
    name: str = "mock-openai"
    # When set, every chat request fails with this status (an outage, for demos and tests).
    fail_status: int | None = None
    fail_message: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    record: bool = False
    # The transcript of each audio answer, by its id (the provider's store of spoken answers).
    audio: dict[str, str] = field(default_factory=dict)
    # A spoken answer's audio tokens a word of its transcript (OpenAI: ~20 a second of speech).
    audio_tokens_per_word: int = 8


def openai_error(status: int, message: str, *, param: str | None = None) -> web.Response:
    etype, code = _ERROR_TYPES.get(status, ("server_error", None))
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def count_words(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            n += len(c.split())
        elif isinstance(c, list):
            n += sum(len(str(p.get("text", "")).split()) for p in c if isinstance(p, dict))
    return n


def reply_text(body: dict[str, Any], opts: MockOptions, override: str | None) -> str:
    if override is not None:
        return override
    last = ""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            last = m["content"]
            break
    echo = " ".join(last.split()[:6])
    words = [f"Hello from {body['model']}.", f"You said: {echo}."] if echo else [f"Hello from {body['model']}."]
    filler = ["This", "is", "a", "mock", "answer", "from", "edgeroute's", "bundled", "provider."]
    words += [filler[i % len(filler)] for i in range(max(0, opts.reply_words - 6))]
    return " ".join(words)


def named_tool(body: dict[str, Any]) -> str | None:
    """The function `tool_choice` forces by name, if any. OpenAI then ends the answer with
    finish_reason `stop`, not `tool_calls`."""
    tc = body.get("tool_choice")
    fn = tc.get("function") if isinstance(tc, dict) else None
    return fn.get("name") if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


def tool_call_for(body: dict[str, Any]) -> dict[str, Any] | None:
    """Calls the first tool (the one `tool_choice` names) when tools are offered and the
    conversation has no tool result yet."""
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none":
        return None
    if any(m.get("role") == "tool" for m in body.get("messages", [])):
        return None
    named = named_tool(body)
    fn = next(
        (t["function"] for t in tools if t.get("function", {}).get("name") == named), tools[0].get("function", {})
    )
    props = (fn.get("parameters") or {}).get("properties") or {}
    args = {k: ("Paris" if v.get("type") == "string" else 1) for k, v in props.items()}
    return {
        "id": f"call_mock{next(_ids)}",
        "type": "function",
        "function": {"name": fn.get("name", "tool"), "arguments": orjson.dumps(args).decode()},
    }


def prediction_words(body: dict[str, Any]) -> list[str]:
    """The words of a request's Predicted Output (`prediction.content`, a string or text parts)."""
    p = body.get("prediction")
    content = p.get("content") if isinstance(p, dict) else None
    if isinstance(content, list):
        content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return content.split() if isinstance(content, str) else []


def _heard(body: dict[str, Any], opts: MockOptions) -> tuple[str, int] | web.Response | None:
    """What the audio named in the request's messages said and its audio tokens, each
    reference read (and billed) again (None: none named), or OpenAI's error for an id the
    provider does not keep."""
    said = []
    for m in body["messages"]:
        audio = m.get("audio") if isinstance(m, dict) else None
        if isinstance(audio, dict) and "id" in audio:
            if audio["id"] not in opts.audio:
                return openai_error(400, f"Audio with id '{audio['id']}' not found.", param="messages")
            said.append(opts.audio[audio["id"]])
    return (" ".join(said), sum(_clip_tokens(opts, t) for t in said)) if said else None


def _clip_tokens(opts: MockOptions, transcript: str) -> int:
    return max(1, len(transcript.split())) * opts.audio_tokens_per_word


def _spoken(opts: MockOptions, transcript: str) -> dict[str, Any]:
    """A spoken answer, kept under a new id."""
    aid = f"audio_mock{next(_ids):06d}"
    opts.audio[aid] = transcript
    return {"id": aid, "data": "UklGRg==", "transcript": transcript, "expires_at": int(time.time()) + 3600}


def usage(prompt: int, completion: int, rejected: int = 0, heard: int = 0, spoke: int = 0) -> dict[str, Any]:
    """`rejected`: the prediction's tokens the answer did not use, which OpenAI counts in
    `completion_tokens` (and bills) too; `heard`, `spoke`: the audio tokens among the prompt's
    and the completion's."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": heard},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": spoke,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": rejected,
        },
    }


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# -- wire-format builders, shared with the bench harness's fast upstreams -----

DONE_EVENT = b"data: [DONE]\n\n"


def new_completion_id() -> str:
    return f"chatcmpl-mock{next(_ids)}"


def completion_body(
    cid: str,
    created: int,
    model: str,
    content: str | None,
    finish: str,
    prompt_tokens: int,
    completion_tokens: int,
    call: dict[str, Any] | None = None,
    rejected: int = 0,
    audio: dict[str, Any] | None = None,
    heard: int = 0,
    spoke: int = 0,
) -> bytes:
    """A non-streaming `chat.completion` object, serialised (`audio`: its spoken answer, whose
    transcript is then its content; `heard`, `spoke`: the audio tokens of its usage)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if call:
        message["tool_calls"] = [call]
    if audio is not None:
        message["content"], message["audio"] = None, audio
    return orjson.dumps(
        {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens, rejected, heard, spoke),
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        }
    )


def chunk_base(cid: str, created: int, model: str) -> dict[str, Any]:
    """The fields every `chat.completion.chunk` of one stream shares."""
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }


def chunk_event(
    base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None, include_usage: bool = False
) -> bytes:
    """One SSE event holding a `chat.completion.chunk` with one choice."""
    c: dict[str, Any] = {
        **base,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        c["usage"] = None
    return _sse(c)


def usage_event(
    base: dict[str, Any], prompt_tokens: int, completion_tokens: int, rejected: int = 0, heard: int = 0, spoke: int = 0
) -> bytes:
    """The final usage-only chunk sent when `stream_options.include_usage` is set."""
    return _sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens, rejected, heard, spoke)})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    opts: MockOptions = request.app[OPTIONS]
    if opts.api_key is not None and request.headers.get("Authorization") != f"Bearer {opts.api_key}":
        return openai_error(401, "Incorrect API key provided.")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return openai_error(400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return openai_error(400, "you must provide a model parameter", param="model")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return openai_error(400, "Missing required parameter: 'messages'.", param="messages")
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body})
    model = body["model"]
    if opts.models is not None and model not in opts.models:
        return openai_error(404, f"The model `{model}` does not exist or you do not have access to it.")
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        resp = openai_error(status, opts.fail_message or f"Mock error {status}.")
        if "x-mock-retry-after" in request.headers:
            resp.headers["retry-after"] = request.headers["x-mock-retry-after"]
        return resp

    heard = _heard(body, opts)
    if isinstance(heard, web.Response):
        return heard
    heard_tokens = heard[1] if heard is not None else 0  # each clip named is read again: prompt
    prompt_tokens = 3 + 4 * len(body["messages"]) + count_words(body["messages"]) + heard_tokens
    call = tool_call_for(body)
    text = None if call else reply_text(body, opts, request.headers.get("x-mock-content"))
    if heard is not None and call is None:
        text = f"The audio said: {heard[0]}"
    speaks = "audio" in (body.get("modalities") or ()) and call is None
    pieces = text.split(" ") if text is not None else []
    completion_tokens = len(pieces) if call is None else 12
    cid = new_completion_id()
    created = int(time.time())
    finish = "tool_calls" if call and named_tool(body) is None else "stop"
    if body.get("max_tokens") is not None and call is None and body["max_tokens"] < len(pieces):
        pieces = pieces[: body["max_tokens"]]
        completion_tokens = len(pieces)
        finish = "length"
    # A Predicted Output's words the answer does not use are rejected: billed as completion tokens.
    predicted = prediction_words(body)
    rejected = len(predicted) - len(set(predicted) & set(pieces)) if predicted else 0
    completion_tokens += rejected
    # The spoken clip is among the completion tokens, as its audio tokens.
    spoke = _clip_tokens(opts, " ".join(pieces)) if speaks else 0
    completion_tokens += spoke

    if not body.get("stream"):
        content = " ".join(pieces) if call is None else None
        audio = _spoken(opts, content or "") if speaks else None
        return web.Response(
            body=completion_body(
                cid,
                created,
                model,
                content,
                finish,
                prompt_tokens,
                completion_tokens,
                call,
                rejected,
                audio,
                heard_tokens,
                spoke,
            ),
            content_type="application/json",
        )

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    base = chunk_base(cid, created, model)

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return chunk_event(base, delta, finish_reason, include_usage)

    await out.write(chunk({"role": "assistant", "content": "", "refusal": None}))
    if call:
        head = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        await out.write(chunk({"tool_calls": [head]}))
        args = call["function"]["arguments"]
        for i in range(0, len(args), 8):
            if opts.chunk_interval:
                await asyncio.sleep(opts.chunk_interval)
            await out.write(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 8]}}]}))
    if speaks:  # the transcript in pieces (the first with the audio's id), then the audio and its expiry
        audio = _spoken(opts, " ".join(pieces))
        for i, piece in enumerate(pieces):
            said = {"transcript": piece if i == 0 else " " + piece}
            await out.write(chunk({"audio": {"id": audio["id"], **said} if i == 0 else said}))
        await out.write(chunk({"audio": {"data": audio["data"]}}))
        await out.write(chunk({"audio": {"expires_at": audio["expires_at"]}}))
        pieces = []
    for i, piece in enumerate(pieces):
        if opts.chunk_interval:
            await asyncio.sleep(opts.chunk_interval)
        await out.write(chunk({"content": piece if i == 0 else " " + piece}))
    await out.write(chunk({}, finish))
    if include_usage:
        await out.write(usage_event(base, prompt_tokens, completion_tokens, rejected, heard_tokens, spoke))
    await out.write(DONE_EVENT)
    await out.write_eof()
    return out


async def list_models(request: web.Request) -> web.Response:
    opts: MockOptions = request.app[OPTIONS]
    if opts.api_key is not None and request.headers.get("Authorization") != f"Bearer {opts.api_key}":
        return openai_error(401, "Incorrect API key provided.")  # OpenAI's /v1/models asks for the key too
    if opts.fail_status is not None:
        return openai_error(opts.fail_status, f"Mock error {opts.fail_status}.")
    names = opts.models or ["gpt-4o", "gpt-4o-mini"]
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": opts.name} for m in names]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


OPTIONS = web.AppKey("options", MockOptions)


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (paths with and without the /v1 prefix)."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[refused_as(lambda m: openai_error(400, m))])
    app[OPTIONS] = options or MockOptions()
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_get(f"{prefix}/models", list_models)
        openai_endpoints.add_routes(app, prefix, app[OPTIONS], openai_error)
    return app
