"""A mock of Anthropic's Messages API, faithful to its wire format.

Answers `POST /v1/messages` (JSON, or SSE with message_start, content_block_start,
ping, content_block_delta (text_delta, input_json_delta), content_block_stop,
message_delta, message_stop), with Anthropic's usage fields (cache reads included)
and error bodies (`{"type": "error", "error": {...}}`, 529 overloaded_error). It
writes the same reply as the OpenAI mock for the same conversation, so answers
translated from it can be compared field by field with OpenAI's.

Per-request headers as in the OpenAI mock (``x-mock-latency-ms``, ``x-mock-status``,
``x-mock-retry-after``, ``x-mock-content``), plus ``x-mock-web-searches: N``: the answer's usage
reports N server web searches (`server_tool_use.web_search_requests`, in the JSON answer and the
stream's final `message_delta`), and ``x-mock-stream-error``: a stream
that fails with an `overloaded_error` event before any content. A request with a code execution
tool or a `container` is answered with its container (`container: {id, expires_at}`, in the
stream's final `message_delta`): the one it names, or a new one; with ``x-mock-output-file:
NAME`` too, its code writes a file: a `server_tool_use` block and its
`bash_code_execution_tool_result`, whose output names the file's `file_id`, before the text.

`document` blocks are read as Anthropic reads them: a base64 PDF (`application/pdf` only) at
`PDF_PAGE_TOKENS` a page (its page objects counted), a plain text or content document as
text, one fetched (`url`) or of the Files API (`file`) at `FETCHED_TOKENS`; a source of another
shape is a 400.
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import re
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edgeroute.mock import openai as openai_mock
from edgeroute.mock.unreadable import refused_as

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_ids = itertools.count(1)
_SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_")
PDF_PAGE_TOKENS = 2_200  # a page of text as Claude counts it (its text and its image)
FETCHED_TOKENS = 3_000  # a document the mock does not hold (a URL, a Files API file)
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
THOUGHT = "The user greets me; a short greeting back."
SIGNATURE = "mock-signature-0001"


@dataclass
class MockOptions(openai_mock.MockOptions):
    name: str = "mock-anthropic"
    # Prompt tokens reported as read from the prompt cache.
    cached_tokens: int = 0
    # Prompt tokens reported as written to the prompt cache.
    cache_write_tokens: int = 0


def anthropic_error(status: int, message: str) -> web.Response:
    etype = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": f"req_mock{next(_ids)}"}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_block_text(b) for b in content if isinstance(b, dict))
    return ""


def _block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "document":
        src = block.get("source") or {}
        inner = src.get("data") if src.get("type") == "text" else src.get("content")
        return " ".join(x for x in (block.get("title"), block.get("context"), _text(inner)) if isinstance(x, str))
    return _text(block.get("content"))


def _document_error(block: Any) -> str | None:
    """Anthropic's refusal of a document block of a shape it does not take, or None."""
    src = block.get("source") if isinstance(block, dict) else None
    if not isinstance(src, dict):
        return "document.source: Field required"
    kind = src.get("type")
    if kind == "base64" and src.get("media_type") == "application/pdf" and isinstance(src.get("data"), str):
        try:
            binascii.a2b_base64(src["data"], strict_mode=True)
        except (binascii.Error, ValueError):
            return "The PDF specified was not valid."
        return None
    ok = (
        (kind == "text" and src.get("media_type") == "text/plain" and isinstance(src.get("data"), str))
        or (kind == "content" and isinstance(src.get("content"), (str, list)))
        or (kind == "url" and isinstance(src.get("url"), str))
        or (kind == "file" and isinstance(src.get("file_id"), str))
    )
    return None if ok else "document.source: Input tag does not match any of the expected tags"


def _documents(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's document blocks: in its turns, and in its tool results."""
    blocks = [b for m in body["messages"] if isinstance(m, dict) for b in _blocks(m.get("content"))]
    inner = [b for t in blocks if t.get("type") == "tool_result" for b in _blocks(t.get("content"))]
    return [b for b in blocks + inner if b.get("type") == "document"]


def _blocks(content: Any) -> list[dict[str, Any]]:
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _document_tokens(block: dict[str, Any]) -> int:
    """A document's tokens beyond its text: a PDF's pages, or a fetched document's."""
    src = block.get("source") or {}
    if src.get("type") == "base64":
        pdf = binascii.a2b_base64(src["data"])
        return PDF_PAGE_TOKENS * max(1, len(_PAGE.findall(pdf)))
    return FETCHED_TOKENS if src.get("type") in ("url", "file") else 0


def _as_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The conversation as the OpenAI mock sees it, so both mocks write the same reply."""
    msgs = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body["messages"]]
    return {"model": body["model"], "messages": msgs}


def _prompt_tokens(body: dict[str, Any]) -> int:
    system = _text(body.get("system"))
    n = len(body["messages"]) + (1 if system else 0)
    text = sum(len(_text(m.get("content")).split()) for m in body["messages"])
    return 3 + 4 * n + len(system.split()) + text + sum(_document_tokens(d) for d in _documents(body))


def _code_run(body: dict[str, Any], name: str | None, mid: str) -> list[dict[str, Any]]:
    """The blocks of a code execution run that writes file `name` (none without the tool)."""
    tools = body.get("tools")
    if name is None or not any(
        isinstance(t, dict) and str(t.get("type", "")).startswith("code_execution_") for t in tools or ()
    ):
        return []
    use_id = "srvtoolu_" + mid.removeprefix("msg_")
    output = {"type": "bash_code_execution_output", "file_id": "file_" + mid.removeprefix("msg_")}
    result = {"type": "bash_code_execution_result", "stdout": "", "stderr": "", "return_code": 0, "content": [output]}
    return [
        {"type": "server_tool_use", "id": use_id, "name": "bash_code_execution", "input": {"command": f"touch {name}"}},
        {"type": "bash_code_execution_tool_result", "tool_use_id": use_id, "content": result},
    ]


def _tool_use(body: dict[str, Any]) -> dict[str, Any] | None:
    # Anthropic's server tools (`code_execution_...`) are run by it, never asked of the client.
    tools = [t for t in body.get("tools") or () if not str(t.get("type", "")).startswith(_SERVER_TOOLS)]
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") == "none":
        return None
    for m in body["messages"]:
        if isinstance(m.get("content"), list) and any(b.get("type") == "tool_result" for b in m["content"]):
            return None
    tool = tools[0]
    if choice.get("type") == "tool":
        tool = next((t for t in tools if t.get("name") == choice.get("name")), tool)
    props = (tool.get("input_schema") or {}).get("properties") or {}
    args = {k: ("Paris" if v.get("type") == "string" else 1) for k, v in props.items()}
    return {"type": "tool_use", "id": f"toolu_mock{next(_ids):06d}", "name": tool.get("name"), "input": args}


def _usage(opts: MockOptions, prompt: int, output: int) -> dict[str, Any]:
    cached = min(opts.cached_tokens, prompt)
    written = min(opts.cache_write_tokens, prompt - cached)
    return {
        "input_tokens": prompt - cached - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": output,
        "service_tier": "standard",
    }


def _container(body: dict[str, Any], mid: str) -> dict[str, Any]:
    """The answer's `container` field: the container the request names, or a new one when it
    has a code execution tool; nothing otherwise."""
    named = body.get("container")
    cid = named.get("id") if isinstance(named, dict) else named
    tools = body.get("tools")
    executes = isinstance(tools, list) and any(
        isinstance(t, dict) and str(t.get("type", "")).startswith("code_execution_") for t in tools
    )
    if not isinstance(cid, str):
        if not executes and named is None:
            return {}
        cid = "container_" + mid
    return {"container": {"id": cid, "expires_at": "2026-12-06T00:00:00Z"}}


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _key_refused(request: web.Request, opts: MockOptions) -> bool:
    """Whether the request lacks the mock's API key (as `x-api-key` or a bearer token)."""
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return opts.api_key is not None and opts.api_key not in (request.headers.get("x-api-key"), bearer)


async def messages(request: web.Request) -> web.StreamResponse:
    opts: MockOptions = request.app[OPTIONS]
    if _key_refused(request, opts):
        return anthropic_error(401, "invalid x-api-key")
    if "anthropic-version" not in request.headers:
        return anthropic_error(400, "anthropic-version: header is required")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return anthropic_error(400, "There was an issue with your request body: invalid JSON.")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return anthropic_error(400, "model: Field required")
    if not isinstance(body.get("max_tokens"), int):
        return anthropic_error(400, "max_tokens: Field required")
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return anthropic_error(400, "messages: at least one message is required")
    for doc in _documents(body):
        if (refused := _document_error(doc)) is not None:
            return anthropic_error(400, refused)
    if opts.record:
        opts.requests.append({"headers": dict(request.headers), "body": body})
    model = body["model"]
    if opts.models is not None and model not in opts.models:
        return anthropic_error(404, f"model: {model}")
    latency = float(request.headers.get("x-mock-latency-ms", opts.latency_ms))
    if latency:
        await asyncio.sleep(latency / 1000)
    if opts.fail_status is not None or "x-mock-status" in request.headers:
        status = opts.fail_status or int(request.headers["x-mock-status"])
        resp = anthropic_error(status, "Overloaded" if status == 529 else f"Mock error {status}.")
        if "x-mock-retry-after" in request.headers:
            resp.headers["retry-after"] = request.headers["x-mock-retry-after"]
        return resp

    prompt = _prompt_tokens(body)
    call = _tool_use(body)
    thinking = (body.get("thinking") or {}).get("type") == "enabled"  # a thinking block first, as Claude's
    text = None if call else openai_mock.reply_text(_as_openai(body), opts, request.headers.get("x-mock-content"))
    pieces = text.split(" ") if text is not None else []
    stop_reason, stop_sequence = ("tool_use" if call else "end_turn"), None
    if call is None and body["max_tokens"] < len(pieces):
        pieces, stop_reason = pieces[: body["max_tokens"]], "max_tokens"
    for seq in body.get("stop_sequences") or ():
        joined = " ".join(pieces)
        if call is None and seq in joined:
            pieces = joined[: joined.index(seq)].split(" ")
            stop_reason, stop_sequence = "stop_sequence", seq
    output = 12 if call else len(pieces)
    mid = f"msg_mock{next(_ids):06d}"
    searches = int(request.headers.get("x-mock-web-searches", 0))
    server_tools = {"server_tool_use": {"web_search_requests": searches}} if searches else {}
    container = _container(body, mid)
    run = _code_run(body, request.headers.get("x-mock-output-file"), mid)

    if not body.get("stream"):
        content = [*run, call] if call else [*run, {"type": "text", "text": " ".join(pieces)}]
        if thinking:
            content.insert(0, {"type": "thinking", "thinking": THOUGHT, "signature": SIGNATURE})
        msg = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {**_usage(opts, prompt, output), **server_tools},
            **container,
        }
        return web.Response(body=orjson.dumps(msg), content_type="application/json")

    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    start = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(opts, prompt, 1),
    }
    await out.write(_event("message_start", {"type": "message_start", "message": start}))
    if "x-mock-stream-error" in request.headers:
        err = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        await out.write(_event("error", err))
        await out.write_eof()
        return out
    base = 0  # the answer's block index: 1 after a thinking block
    if thinking:
        base = 1
        block0 = {"type": "thinking", "thinking": "", "signature": ""}
        await out.write(
            _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block0})
        )
        for d in ({"type": "thinking_delta", "thinking": THOUGHT}, {"type": "signature_delta", "signature": SIGNATURE}):
            await out.write(_event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}))
        await out.write(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    for block in run:  # the tool's call (its input streamed) and its result, whole
        head = {**block, "input": {}} if block["type"] == "server_tool_use" else block
        start_ev = {"type": "content_block_start", "index": base, "content_block": head}
        await out.write(_event("content_block_start", start_ev))
        if block["type"] == "server_tool_use":
            delta = {"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}
            await out.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": base, "delta": delta})
            )
        await out.write(_event("content_block_stop", {"type": "content_block_stop", "index": base}))
        base += 1
    if call:
        head = {**call, "input": {}}
        await out.write(
            _event("content_block_start", {"type": "content_block_start", "index": base, "content_block": head})
        )
        await out.write(_event("ping", {"type": "ping"}))
        args = orjson.dumps(call["input"]).decode()
        frags = [""] + [args[i : i + 8] for i in range(0, len(args), 8)]
        for frag in frags:
            if opts.chunk_interval:
                await asyncio.sleep(opts.chunk_interval)
            delta = {"type": "input_json_delta", "partial_json": frag}
            await out.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": base, "delta": delta})
            )
    else:
        block = {"type": "text", "text": ""}
        await out.write(
            _event("content_block_start", {"type": "content_block_start", "index": base, "content_block": block})
        )
        await out.write(_event("ping", {"type": "ping"}))
        for i, piece in enumerate(pieces):
            if opts.chunk_interval:
                await asyncio.sleep(opts.chunk_interval)
            delta = {"type": "text_delta", "text": piece if i == 0 else " " + piece}
            await out.write(
                _event("content_block_delta", {"type": "content_block_delta", "index": base, "delta": delta})
            )
    await out.write(_event("content_block_stop", {"type": "content_block_stop", "index": base}))
    end_usage = {"output_tokens": output, **server_tools}
    md = {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence, **container}}
    await out.write(_event("message_delta", {**md, "usage": end_usage}))
    await out.write(_event("message_stop", {"type": "message_stop"}))
    await out.write_eof()
    return out


async def list_models(request: web.Request) -> web.Response:
    opts: MockOptions = request.app[OPTIONS]
    if _key_refused(request, opts):
        return anthropic_error(401, "invalid x-api-key")  # the real API asks for the key here too
    names = opts.models or ["claude-sonnet-4-5", "claude-haiku-4-5"]
    data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in names]
    body = {"data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


OPTIONS = web.AppKey("anthropic_options", MockOptions)


def build_app(options: MockOptions | None = None) -> web.Application:
    """The mock as an aiohttp application (`/v1/messages`, `/v1/models`)."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[refused_as(lambda m: anthropic_error(400, m))])
    app[OPTIONS] = options or MockOptions()
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", list_models)
    return app
