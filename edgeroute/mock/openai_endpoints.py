"""The OpenAI mock's other endpoints: `/v1/embeddings`, `/v1/completions` (legacy) and
`/v1/responses`, faithful to their wire formats (the tests check them with the SDK's types).

Same options and per-request headers as the chat mock (``x-mock-status``,
``x-mock-content``, ``x-mock-latency-ms``), plus, for Responses, ``x-mock-tool-calls`` (e.g.
``web_search=2,code_interpreter=1,image_generation=1``): that many built-in tool call items
(`web_search_call`, ...) before the answer's message, as the upstream reports the calls it
ran; embeddings are deterministic vectors derived from each input, as float lists or base64
float32 as asked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from edgeroute.mock.openai import MockOptions

_ids = itertools.count(1)

# The chat mock's options and error writer, handed over by `add_routes` (the chat mock imports this module).
_OPTIONS: web.AppKey[MockOptions] = web.AppKey("endpoint_options")
_ERROR: web.AppKey[Callable[..., web.Response]] = web.AppKey("endpoint_error")
# Stored responses (`store`, on by default), as OpenAI keeps them: id -> the conversation's text so far.
_STORED: web.AppKey[dict[str, str]] = web.AppKey("stored_responses")
# Their output items, which an input item `{"type": "item_reference", "id": ...}` names: id -> text.
_ITEMS: web.AppKey[dict[str, str]] = web.AppKey("stored_items")


def _options(request: web.Request) -> MockOptions:
    return request.app[_OPTIONS]


def openai_error(request: web.Request, status: int, message: str, *, param: str | None = None) -> web.Response:
    return request.app[_ERROR](status, message, param=param)


async def _admit(request: web.Request, required: str) -> dict[str, Any] | web.Response:
    """The parsed body, or the error OpenAI would answer (key, JSON, model, a provoked status)."""
    opts = _options(request)
    if opts.api_key is not None and request.headers.get("Authorization") != f"Bearer {opts.api_key}":
        return openai_error(request, 401, "Incorrect API key provided.")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return openai_error(request, 400, "We could not parse the JSON body of your request.")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return openai_error(request, 400, "you must provide a model parameter", param="model")
    if body.get(required) in (None, "", []):
        return openai_error(request, 400, f"Missing required parameter: '{required}'.", param=required)
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body, "path": request.path})
    if opts.models is not None and body["model"] not in opts.models:
        return openai_error(
            request, 404, f"The model `{body['model']}` does not exist or you do not have access to it."
        )
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        return openai_error(request, status, opts.fail_message or f"Mock error {status}.")
    return body


# The most dimensions a provider's embedding model gives (OpenAI's text-embedding-3-large,
# Gemini's): a client's `dimensions: 2**53` built a list of that many floats (the mock's
# process killed for memory), where the provider answers a 400.
MAX_DIMENSIONS = 3072


def vector(item: Any, dims: int) -> list[float]:
    """A deterministic unit-ish vector for one input (a string or a token list)."""
    seed = hashlib.sha256(orjson.dumps(item)).digest()
    raw = [(seed[i % len(seed)] - 128) / 128 for i in range(dims)]
    return [round(v, 6) for v in raw]


def _tokens(item: Any) -> int:
    return len(item) if isinstance(item, list) else max(1, len(str(item).split()))


async def embeddings(request: web.Request) -> web.Response:
    got = await _admit(request, "input")
    if isinstance(got, web.Response):
        return got
    raw = got["input"]
    items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    dims = got.get("dimensions") or 8
    if not isinstance(dims, int) or not 1 <= dims <= MAX_DIMENSIONS:
        return openai_error(request, 400, "Invalid value for 'dimensions'.", param="dimensions")
    fmt = got.get("encoding_format") or "float"
    data = []
    for i, item in enumerate(items):
        vec = vector(item, dims)
        emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(_tokens(x) for x in items)
    out = {
        "object": "list",
        "data": data,
        "model": got["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return web.Response(body=orjson.dumps(out), content_type="application/json")


def _reply(prompt: str, request: web.Request) -> list[str]:
    text = request.headers.get("x-mock-content") or f"Completion from the mock. You said: {prompt[:60]}"
    return text.split(" ")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    """Legacy text completions: one choice, JSON or SSE ending with `[DONE]`."""
    got = await _admit(request, "prompt")
    if isinstance(got, web.Response):
        return got
    prompt = got["prompt"] if isinstance(got["prompt"], str) else str(got["prompt"])
    pieces = _reply(prompt, request)
    ptoks = max(1, len(prompt.split()))
    cid, created, model = f"cmpl-mock{next(_ids):06d}", int(time.time()), got["model"]

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    base = {"id": cid, "object": "text_completion", "created": created, "model": model}
    if not got.get("stream"):
        out = {**base, "choices": [choice(" ".join(pieces), "stop")], "usage": _usage(ptoks, len(pieces))}
        return web.Response(body=orjson.dumps(out), content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    opts = _options(request)
    for i, p in enumerate(pieces):
        if opts.chunk_interval:
            await asyncio.sleep(opts.chunk_interval)
        await resp.write(_sse({**base, "choices": [choice(p if i == 0 else " " + p, None)]}))
    await resp.write(_sse({**base, "choices": [choice("", "stop")]}))
    if (got.get("stream_options") or {}).get("include_usage"):
        await resp.write(_sse({**base, "choices": [], "usage": _usage(ptoks, len(pieces))}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def is_item_reference(item: Any) -> bool:
    """An input item that names a stored item by id (its `type` may be left out), or a reasoning
    item without its encrypted content, which the provider reads from its store by id."""
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    if kind == "reasoning":
        return not item.get("encrypted_content")
    return kind == "item_reference" or (kind is None and "role" not in item and "id" in item)


def _input_text(value: Any, items: dict[str, str]) -> str:
    """The input's text, stored items named by reference included; KeyError for an unknown one."""
    if isinstance(value, str):
        return value
    parts: list[str] = []
    for item in value if isinstance(value, list) else ():
        if is_item_reference(item):
            parts.append(items[str(item.get("id"))])
            continue
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(c.get("text", "")) for c in content if isinstance(c, dict)]
    return " ".join(parts)


async def responses(request: web.Request) -> web.StreamResponse:
    """The Responses API: one message of output text; streamed as semantic events (no `[DONE]`)."""
    got = await _admit(request, "input")
    if isinstance(got, web.Response):
        return got
    try:
        prompt = _input_text(got["input"], request.app[_ITEMS])
    except KeyError as e:
        said = f"Item with id '{e.args[0]}' not found."
        body = {"error": {"message": said, "type": "invalid_request_error", "param": "input", "code": None}}
        return web.Response(status=404, body=orjson.dumps(body), content_type="application/json")
    prev = got.get("previous_response_id")
    if prev is not None:  # the stored conversation continued: its text comes first, as the model sees it
        if prev not in request.app[_STORED]:
            said = f"Previous response with id '{prev}' not found."
            err = {"message": said, "type": "invalid_request_error", "param": "previous_response_id"}
            body = {"error": {**err, "code": "previous_response_not_found"}}
            return web.Response(status=404, body=orjson.dumps(body), content_type="application/json")
        prompt = f"{request.app[_STORED][prev]} {prompt}"
    pieces = _reply(prompt, request)
    n = next(_ids)
    rid, mid = f"resp_mock{n:06d}", f"msg_mock{n:06d}"
    text = " ".join(pieces)
    if got.get("store", True) is not False:
        request.app[_STORED][rid] = f"{prompt} {text}"
        request.app[_ITEMS][mid] = text
    ptoks = max(1, len(prompt.split()))
    usage = {
        "input_tokens": ptoks,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": ptoks + len(pieces),
    }

    def response(status: str, output: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "model": got["model"], "output": output, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "error": None, "incomplete_details": None, "instructions": got.get("instructions"),
            "metadata": got.get("metadata") or {}, "temperature": 1.0, "top_p": 1.0,
            "text": {"format": {"type": "text"}}, "usage": usage if with_usage else None,
        }  # fmt: skip

    part = {"type": "output_text", "text": text, "annotations": []}
    message = {"type": "message", "id": mid, "status": "completed", "role": "assistant", "content": [part]}
    calls = _tool_call_items(
        request.headers.get("x-mock-tool-calls", ""), n, _named_container(got.get("tools"), got.get("input"))
    )
    if not got.get("stream"):
        answer = orjson.dumps(response("completed", [*calls, message], True))
        return web.Response(body=answer, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    seq = itertools.count()
    opts = _options(request)

    async def emit(kind: str, **fields: Any) -> None:
        await resp.write(_sse({"type": kind, "sequence_number": next(seq), **fields}, kind))

    await emit("response.created", response=response("in_progress", [], False))
    await emit("response.in_progress", response=response("in_progress", [], False))
    for i, call in enumerate(calls):
        await emit("response.output_item.added", output_index=i, item={**call, "status": "in_progress"})
        await emit("response.output_item.done", output_index=i, item=call)
    at = len(calls)  # the message's output index
    item = {**message, "status": "in_progress", "content": []}
    await emit("response.output_item.added", output_index=at, item=item)
    empty = {**part, "text": ""}
    await emit("response.content_part.added", item_id=mid, output_index=at, content_index=0, part=empty)
    for i, p in enumerate(pieces):
        if opts.chunk_interval:
            await asyncio.sleep(opts.chunk_interval)
        delta = p if i == 0 else " " + p
        await emit(
            "response.output_text.delta", item_id=mid, output_index=at, content_index=0, delta=delta, logprobs=[]
        )
    await emit("response.output_text.done", item_id=mid, output_index=at, content_index=0, text=text, logprobs=[])
    await emit("response.content_part.done", item_id=mid, output_index=at, content_index=0, part=part)
    await emit("response.output_item.done", output_index=at, item=message)
    await emit("response.completed", response=response("completed", [*calls, message], True))
    await resp.write_eof()
    return resp


def _named_container(tools: Any, items: Any) -> str | None:
    """The container a code interpreter tool names by id; in auto mode (`{"type": "auto"}`), as
    OpenAI's, the container of the last `code_interpreter_call` item in the input is reused
    (None: a new one)."""
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "code_interpreter" and isinstance(tool.get("container"), str):
            return str(tool["container"])
    calls = (
        [i for i in items if isinstance(i, dict) and i.get("type") == "code_interpreter_call"]
        if isinstance(items, list)
        else []
    )
    return str(calls[-1]["container_id"]) if calls and isinstance(calls[-1].get("container_id"), str) else None


# A 1x1 PNG, base64: what an `image_generation_call` item's `result` holds (a whole image).
_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="


def _tool_call_items(spec: str, n: int, container: str | None = None) -> list[dict[str, Any]]:
    """The output items of the built-in tool calls `spec` asks for (`web_search=2,file_search=1`),
    in the shapes OpenAI's Responses API gives them; code runs in `container` when the request
    names one."""
    items: list[dict[str, Any]] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        kind, _, count = entry.partition("=")
        for i in range(int(count or 1)):
            iid = f"{kind}_mock{n:06d}_{i}"
            if kind == "web_search":
                action = {"type": "search", "query": "mock query"}
                items.append({"type": "web_search_call", "id": "ws" + iid, "status": "completed", "action": action})
            elif kind == "file_search":
                items.append(
                    {
                        "type": "file_search_call",
                        "id": "fs" + iid,
                        "status": "completed",
                        "queries": ["q"],
                        "results": None,
                    }
                )
            elif kind == "code_interpreter":
                items.append(
                    {"type": "code_interpreter_call", "id": "ci" + iid, "status": "completed", "code": "1+1",
                     "container_id": container or f"cntr_mock{n:06d}", "outputs": None}
                )  # fmt: skip
            elif kind == "image_generation":
                items.append({"type": "image_generation_call", "id": "ig" + iid, "status": "completed", "result": _PNG})
    return items


def add_routes(app: web.Application, prefix: str, options: MockOptions, error: Callable[..., web.Response]) -> None:
    app[_OPTIONS], app[_ERROR], app[_STORED], app[_ITEMS] = options, error, {}, {}
    app.router.add_post(f"{prefix}/embeddings", embeddings)
    app.router.add_post(f"{prefix}/completions", completions)
    app.router.add_post(f"{prefix}/responses", responses)
