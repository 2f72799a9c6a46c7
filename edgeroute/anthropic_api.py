"""Anthropic's Messages API (`POST /v1/messages`) in front of any provider.

An Anthropic SDK client's request is translated into an OpenAI-format chat request
and served by the same pipeline as `/v1/chat/completions` (decision, admission,
dispatch with failover, accounting); the OpenAI-format answer or stream is then
translated back into Anthropic's shape: a `message` object, or the event stream
message_start, content_block_start / content_block_delta (text_delta,
input_json_delta) / content_block_stop, message_delta (stop_reason, usage),
message_stop. Errors, including those raised by the server's middleware for these
paths, take Anthropic's form `{"type": "error", "error": {"type", "message"}}`.

`output_config.format` (structured output) becomes `response_format`. A `tool_result` with
`is_error: true` becomes a tool message whose content opens with "Error: " (OpenAI's has no
such field; an Anthropic deployment gets `is_error` back). A request with
what has no OpenAI equivalent (`top_k`, `thinking` and thinking blocks, `cache_control`,
`output_config.effort`, an `anthropic-beta` header, ...) is served by
`endpoints.messages` instead: passed through to Anthropic deployments, refused or
dropped (by the provider's rule) elsewhere; so is a request with `document` blocks (an
Anthropic deployment gets them as sent, a chat one their translation: a base64 PDF as a chat
`file` part, a text or content document as text parts after its title and context).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from edgeroute import free_requests, large_json, openai_api, redact, sse
from edgeroute.accounting import Usage
from edgeroute.cost import media
from edgeroute.dispatch.attempt import PARSE_ON_LOOP_BYTES
from edgeroute.errors import ProxyError
from edgeroute.providers import openai_format as oa
from edgeroute.request_input import read_body
from edgeroute.state import STATE

PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
_UNDER = "/v1/messages/"  # an unknown path under it (the SDK's `messages.batches`) is an Anthropic client's
_MODELS = "/v1/models"  # asked with `anthropic-version` (the Anthropic SDK always sends it, OpenAI's never)


def anthropic_path(path: str) -> bool:
    """Whether errors on `path` are in Anthropic's format whoever asks."""
    return path in PATHS or path.startswith(_UNDER)


def anthropic_client(path: str, headers: Mapping[str, str]) -> bool:
    """Whether a request for `path` is an Anthropic client's, its errors in Anthropic's format."""
    return anthropic_path(path) or (path.startswith(_MODELS) and "anthropic-version" in headers)


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_ANTHROPIC_ERRORS = frozenset(ERROR_TYPES.values()) | {"api_error"}

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _bad(message: str, param: str | None = None) -> ProxyError:
    return ProxyError(400, message, code="invalid_request", param=param)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


# -- request: Anthropic → OpenAI ---------------------------------------------


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for b in content:
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise _bad(f"{where}: only text blocks are supported here.")
            out.append(b["text"])
        return "\n".join(out) if len(out) > 1 else "".join(out)
    raise _bad(f"{where}: expected a string or a list of content blocks.")


def _image_part(block: dict[str, Any]) -> dict[str, Any]:
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad("messages: image blocks need a base64 or url source.")
    if src.get("type") == "base64" and isinstance(src.get("data"), str):
        url = f"data:{src.get('media_type', 'image/png')};base64,{src['data']}"
    elif src.get("type") == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise _bad("messages: image blocks need a base64 or url source.")
    return {"type": "image_url", "image_url": {"url": url}}


# A document's source that only Anthropic reads: a URL it fetches, a file of its Files API.
_ANTHROPIC_SOURCES = {"url": "a URL Anthropic fetches", "file": "a file of Anthropic's Files API"}


def untranslatable_document(block: Any) -> str | None:
    """Why a `document` block cannot reach a chat deployment (its source only Anthropic reads),
    or None: a base64 PDF becomes a chat `file` part, a text or content document text parts."""
    if not isinstance(block, dict) or block.get("type") != "document":
        return None
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    return _ANTHROPIC_SOURCES.get(kind) if isinstance(kind, str) else None


def _document_parts(block: dict[str, Any], where: str, native: bool) -> list[dict[str, Any]]:
    """A `document` block as chat parts: a base64 PDF as a `file` part (`file_data`), a plain
    text or content document as text (its title and context first). A URL or Files API source
    only Anthropic reads: with `native` (passed through as sent) a `file` part stands for it, so
    that it is reserved for as a file; otherwise a 400."""
    src = block.get("source")
    if not isinstance(src, dict):
        raise _bad(f"{where}.source: Field required", "messages")
    kind = src.get("type")
    title = block.get("title") if isinstance(block.get("title"), str) else None
    if kind == "base64" and src.get("media_type") == "application/pdf" and isinstance(src.get("data"), str):
        data = "data:application/pdf;base64," + src["data"]
        return [{"type": "file", "file": {"filename": title or "document.pdf", "file_data": data}}]
    if kind in _ANTHROPIC_SOURCES and isinstance(src.get(kind if kind == "url" else "file_id"), str):
        if not native:
            raise _bad(f"{where}: a document whose source is {_ANTHROPIC_SOURCES[kind]} is read by Anthropic only.")
        return [{"type": "file", "file": {"filename": title or "document.pdf"}}]
    if kind == "text" and isinstance(src.get("data"), str):
        parts = [{"type": "text", "text": src["data"]}]
    elif kind == "content" and isinstance(src.get("content"), (str, list)):
        inner = src["content"]
        blocks = [{"type": "text", "text": inner}] if isinstance(inner, str) else inner
        parts = []
        for k, b in enumerate(blocks):
            if isinstance(b, dict) and b.get("type") == "image":
                parts.append(_image_part(b))
            elif isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                parts.append({"type": "text", "text": b["text"]})
            else:
                raise _bad(f"{where}.source.content.{k}: a document's content holds text and image blocks.")
    else:
        raise _bad(
            f"{where}.source: a document's source is a base64 PDF, plain text, content blocks, a url or a file.",
            "messages",
        )
    head = "\n".join(x for x in (title, block.get("context")) if isinstance(x, str) and x)
    if head:  # what the model is told of the document, before it
        parts.insert(0, {"type": "text", "text": head + "\n\n"})
    return parts


def tool_result_media(block: Any) -> bool:
    """Whether a `tool_result` holds more than text (an image, a document: a screenshot of
    computer use), which a chat tool message cannot take; only Anthropic reads it back."""
    inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
    return isinstance(inner, list) and any(isinstance(x, dict) and x.get("type") != "text" for x in inner)


def _media_parts(block: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """A tool result's block as chat parts (`native`: for routing and counting)."""
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return [{"type": "text", "text": block["text"]}]
    if kind == "image":
        return [_image_part(block)]
    if kind == "document":
        return _document_parts(block, where, True)
    return [{"type": "text", "text": _server_block_text(block)}]  # a search result, ...: Anthropic judges it


def _block_text(block: dict[str, Any], i: int, j: int) -> str:
    """A text block's text: one that is not a string is a 400, as Anthropic answers it; read with
    `str()`, a null or missing text reached the model as the word "None" (or as "")."""
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"messages.{i}.content.{j}.text: Input should be a valid string", "messages")
    return text


# History blocks of Anthropic's server tools beside these: `*_tool_result` (web search, code execution, ...).
# A `container_upload` puts a file of its Files API into code execution's container.
_SERVER_BLOCKS = frozenset({"server_tool_use", "mcp_tool_use", "container_upload"})


def is_server_block(block: Any) -> bool:
    """A block of Anthropic's server tools in a conversation's history (`server_tool_use`,
    `web_search_tool_result`, `code_execution_tool_result`, `mcp_tool_use`, ...): only Anthropic
    takes it back."""
    kind = block.get("type") if isinstance(block, dict) else None
    return isinstance(kind, str) and (
        kind in _SERVER_BLOCKS or (kind.endswith("_tool_result") and kind != "tool_result")
    )


def _server_block_text(block: dict[str, Any]) -> str:
    """A server tool's block as text, for routing and counting only (the request passes through
    to Anthropic as sent): its JSON."""
    return orjson.dumps(block).decode()


def _user_turn(content: Any, i: int, native: bool = False) -> list[dict[str, Any]]:
    """OpenAI messages for one Anthropic user turn: its tool results first, then its other content."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise _bad(f"messages.{i}.content: expected a string or a list of content blocks.")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _block_text(b, i, j)})
        elif kind == "image":
            parts.append(_image_part(b))
        elif kind == "document":
            parts.extend(_document_parts(b, f"messages.{i}.content.{j}", native))
        elif kind == "tool_result":
            if not isinstance(b.get("tool_use_id"), str):  # a tool message answering no call
                raise _bad(f"messages.{i}.content.{j}.tool_result.tool_use_id: Field required", "messages")
            inner = b.get("content")
            failed = b.get("is_error")
            if failed is not None and type(failed) is not bool:
                raise _bad(f"messages.{i}.content.{j}.is_error: Input should be a valid boolean", "messages")
            if native and tool_result_media(b):  # for routing and counting: passed through as sent
                where = f"messages.{i}.content.{j}.content"
                media = [p for k, x in enumerate(inner) if isinstance(x, dict) for p in _media_parts(x, f"{where}.{k}")]
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": media})
                continue
            text = "" if inner is None else _text(inner, f"messages.{i}.content.tool_result")
            if failed and not text.startswith(oa.TOOL_ERROR_PREFIX):  # dropped, the model took it for an answer
                text = oa.TOOL_ERROR_PREFIX + text  # (one that says so already is not told twice)
            results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
        elif native and is_server_block(b):
            parts.append({"type": "text", "text": _server_block_text(b)})
        else:
            raise _bad(f"messages.{i}.content: blocks of type {kind!r} are not supported by edgeroute.")
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        text_content = "".join(p["text"] for p in parts) if only_text and len(parts) == 1 else None
        results.append({"role": "user", "content": text_content if text_content is not None else parts})
    return results


def _assistant_turn(content: Any, i: int, native: bool = False) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise _bad(f"messages.{i}.content: expected a string or a list of content blocks.")
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text":
            text.append(_block_text(b, i, j))
        elif kind == "tool_use":
            args = orjson.dumps(b.get("input") or {}).decode()
            calls.append(
                {"id": b.get("id"), "type": "function", "function": {"name": b.get("name"), "arguments": args}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own reasoning: other providers cannot take it back
        elif native and is_server_block(b):
            text.append(_server_block_text(b))
        else:
            raise _bad(f"messages.{i}.content: blocks of type {kind!r} are not supported by edgeroute.")
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def is_anthropic_tool(t: Any) -> bool:
    """A tool of Anthropic's own (`web_search_20250305`, `code_execution_...`): a versioned type
    only Anthropic runs or knows."""
    return isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] != "custom" and "_20" in t["type"]


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools: expected a list.", "tools")
    out = []
    for i, t in enumerate(tools):
        if is_anthropic_tool(t):
            continue  # Anthropic's own (web search, ...): the request goes to Anthropic as sent (messages.lost_fields)
        if not isinstance(t, dict) or t.get("type") not in (None, "custom") or not isinstance(t.get("name"), str):
            raise _bad("tools: only custom tools (name, description, input_schema) are supported.", "tools")
        if t.get("input_schema") is None:  # Anthropic's 400: no schema is no tool
            raise _bad(f"tools.{i}.custom.input_schema: Field required", "tools")
        if not isinstance(t["input_schema"], dict):
            raise _bad("tools: a tool's input_schema must be a JSON Schema object.", "tools")
        if t.get("description") is not None and not isinstance(t["description"], str):
            raise _bad("tools: a tool's description must be a string.", "tools")
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _check_sampling(req: dict[str, Any]) -> None:
    """Anthropic's ranges for its sampling parameters, checked before either path (translated or
    passed through): `temperature: true` or 3 was sent on, and the upstream's refusal came back."""
    for name, hi in (("temperature", 1.0), ("top_p", 1.0)):
        v = req.get(name)
        if v is not None and (type(v) not in (int, float) or not 0 <= v <= hi):
            raise _bad(f"{name}: Input should be a number from 0 to {hi:g}", name)
    top_k = req.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k < 0):
        raise _bad("top_k: Input should be a non-negative integer", "top_k")


def _check_types(req: dict[str, Any]) -> None:
    """`model`, `max_tokens` and `stream` of the types Anthropic reads them as: `"stream": "yes"`
    was a stream, and a `max_tokens` of `"5"` or `5.5` (or a `model` of 5) "Field required"."""
    if req.get("model") is None:
        raise _bad("model: Field required", "model")
    if not isinstance(req["model"], str):
        raise _bad("model: Input should be a valid string", "model")
    max_tokens = req.get("max_tokens")
    if max_tokens is not None and type(max_tokens) is not int:
        raise _bad("max_tokens: Input should be a valid integer", "max_tokens")
    if req.get("stream") is not None and type(req["stream"]) is not bool:
        raise _bad("stream: Input should be a valid boolean", "stream")


def to_openai(req: Any, *, counting: bool = False, native: bool = False) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request (`counting`: for count_tokens, no
    max_tokens). With `native` (a request passed through to Anthropic as sent, `messages.parse`),
    Anthropic's server tool blocks in the history are read as text, for routing and counting."""
    if not isinstance(req, dict):
        raise _bad("The request body must be a JSON object.")
    if counting:
        req = {**req, "max_tokens": 1, "stream": False}
    _check_types(req)
    if req.get("max_tokens") is None:
        raise _bad("max_tokens: Field required", "max_tokens")
    if req["max_tokens"] < 1:
        raise _bad("max_tokens: Input should be greater than or equal to 1", "max_tokens")
    _check_sampling(req)
    if not isinstance(req.get("messages"), list):
        raise _bad("messages: Field required", "messages")
    messages: list[dict[str, Any]] = []
    if req.get("system"):
        messages.append({"role": "system", "content": _text(req["system"], "system")})
    for i, m in enumerate(req["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"messages.{i}.role: must be user or assistant.", "messages")
        if m["role"] == "user":
            messages.extend(_user_turn(m.get("content"), i, native))
        else:
            messages.append(_assistant_turn(m.get("content"), i, native))
    out: dict[str, Any] = {"model": req["model"], "messages": messages, "max_tokens": req["max_tokens"]}
    stops = req.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(x, str) for x in stops)):
        raise _bad("stop_sequences: Input should be a valid list of strings", "stop_sequences")
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("stop_sequences", "stop")):
        if req.get(ours) is not None:
            out[theirs] = req[ours]
    metadata = req.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _bad("metadata: expected an object.", "metadata")
    user = (metadata or {}).get("user_id")
    if user is not None and not isinstance(user, str):
        raise _bad("metadata.user_id: Input should be a valid string", "metadata")
    if isinstance(user, str):
        out["user"] = user
    if req.get("tools"):
        out["tools"] = _tools(req["tools"])
    tc = req.get("tool_choice")
    if tc is not None and not isinstance(tc, dict):
        raise _bad("tool_choice: Input should be a valid dictionary", "tool_choice")
    if isinstance(tc, dict):
        kind = tc.get("type")
        if kind == "tool" and not isinstance(tc.get("name"), str):
            raise _bad("tool_choice.tool.name: Field required", "tool_choice")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[str(kind)]
        else:
            raise _bad("tool_choice: type must be auto, any, tool or none.", "tool_choice")
        if tc.get("disable_parallel_tool_use") and out.get("tools"):
            out["parallel_tool_calls"] = False
    output_config = req.get("output_config")
    if output_config is not None and not isinstance(output_config, dict):
        raise _bad("output_config: expected an object.", "output_config")
    fmt = (output_config or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema")}}
    if req.get("stream"):
        out["stream"] = True
        # message_delta carries the usage: ask every upstream for it.
        out["stream_options"] = {"include_usage": True}
    return out


async def read_request(request: web.Request, *, counting: bool = False) -> bytes:
    """The request in OpenAI's format (a large one translated in a worker thread)."""
    raw = await read_body(request)
    if len(raw) > PARSE_ON_LOOP_BYTES:
        return await asyncio.to_thread(_translated, raw, counting)
    return _translated(raw, counting)


def _translated(raw: bytes, counting: bool) -> bytes:
    try:
        req = large_json.loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("The request body is not valid JSON.") from None
    return orjson.dumps(to_openai(req, counting=counting, native=counting))  # counted: server tool turns too


# -- answer: OpenAI → Anthropic ----------------------------------------------


def anthropic_usage(u: Any) -> dict[str, Any]:
    """OpenAI usage in Anthropic's terms: input_tokens excludes cache reads. Read as the ledger
    reads it (`Usage.from_openai`): an upstream's garbage (a list, a string, a negative or
    64-bit-overflowing count) is zeros, never an exception after the answer was paid for. A
    prompt of no tokens is shown as said (the ledger counts it instead)."""
    usage = Usage.from_openai(u, prompted=False) or Usage()
    cached, written = usage.cached_tokens, usage.cache_write_tokens
    return {
        "input_tokens": usage.prompt_tokens - cached - written,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
    }


def _message_id(raw: Any) -> str:
    cid = str(raw or "")
    return cid if cid.startswith("msg_") else "msg_" + cid.removeprefix("chatcmpl-")


def _tool_input(arguments: Any, truncated: bool) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's `input` object. Cut off by the token limit
    (`truncated`), an unfinished JSON text is `{}`, as Anthropic answers such a call (with
    stop_reason `max_tokens`): it was a 502, the answer paid for, and retried by the SDK."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        if truncated:
            return {}
        raise ProxyError(502, "The upstream answered a tool call with invalid JSON arguments.") from None
    if not isinstance(value, dict):
        raise ProxyError(502, "The upstream answered a tool call whose arguments are not a JSON object.")
    return value


def stop_reason(finish: Any, called: bool) -> str:
    """Anthropic's stop reason for an OpenAI finish reason. An answer that calls tools and ends
    with `stop` is a `tool_use` stop, as Anthropic reports it: OpenAI ends so an answer whose
    tool `tool_choice` forced by name (Gemini's OpenAI-compatible API, any answer with calls);
    told `end_turn`, an agent loop took the call for the final answer and never ran it."""
    reason = STOP_REASONS.get(str(finish), "end_turn")
    if called:
        return "tool_use" if reason == "end_turn" else reason
    # `tool_calls` with no call (a server whose tool parser failed sends the call as text): told
    # `tool_use` with no tool_use block, an agent loop sent an empty tool-result turn or spun.
    return "end_turn" if reason == "tool_use" else reason


def _string(value: Any) -> str:
    """A careless upstream's null (or number) id or tool name as the string Anthropic's SDK types
    declare: a null was relayed, and `block.name` was None in the client's hands."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def content_text(content: Any) -> Any:
    """An answer's content as text: a list of parts (Mistral's reasoning models answer
    `[{type: thinking}, {type: text}]`) is its text parts joined, other parts dropped (it was a
    paid 502); anything else as it came."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) for p in content):
        raise UnreadableAnswer("content is a list of something other than parts")
    texts = [p.get("text") for p in content if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise UnreadableAnswer("a text part's text is not a string")
    return "".join(texts)


def to_anthropic(obj: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic `message`."""
    choice = (obj.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = content_text(msg.get("content")) or msg.get("refusal")
    if text and not isinstance(text, str):
        raise UnreadableAnswer("content is not a string")
    if text:
        content.append({"type": "text", "text": text})
    truncated = choice.get("finish_reason") == "length"
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": _string(call.get("id")),
                "name": _string(fn.get("name")),
                "input": _tool_input(fn.get("arguments"), truncated),
            }
        )
    return {
        "id": _message_id(obj.get("id")),
        "type": "message",
        "role": "assistant",
        "model": obj.get("model", ""),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), any(b["type"] == "tool_use" for b in content)),
        "stop_sequence": None,
        "usage": anthropic_usage(obj.get("usage")),
    }


class UnreadableAnswer(ValueError):
    """An upstream's chat answer or chunk of a shape no OpenAI server sends."""


_SHAPE_ERRORS = (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError)


def answer_json(body: bytes) -> bytes:
    # A careless upstream's 200 (`choices` a string, `[null]`, a list as content) is its
    # fault: a 502 in Anthropic's format like any unreadable answer, never our 500.
    try:
        return orjson.dumps(to_anthropic(orjson.loads(body)))
    except _SHAPE_ERRORS:
        raise ProxyError(502, "The upstream's answer could not be read as a chat completion.") from None


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


_CUT = "The upstream ended the stream before the answer did; the answer is incomplete."


class _HeldCall:
    """A streamed tool call, held until the answer's finish: its id and name may come after its
    first delta, its arguments after text between them, and they must be JSON to be sent."""

    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []

    def add(self, tc: dict[str, Any]) -> None:
        fn = tc.get("function") or {}
        self.id = self.id or _string(tc.get("id"))
        self.name = self.name or _string(fn.get("name"))
        if (args := fn.get("arguments")) and isinstance(args, str):
            self.args.append(args)

    def arguments(self, truncated: bool) -> str:
        """The arguments' JSON text ("" for none), checked as the answer not streamed checks them
        (`_tool_input`): a call cut by the token limit has none. Raises `UnreadableCall`."""
        text = "".join(self.args)
        if not text.strip():
            return ""
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            if truncated:
                return ""
            msg = "The upstream sent a tool call with invalid JSON arguments; the answer is incomplete."
            raise UnreadableCall(msg) from None
        if not isinstance(value, dict):
            raise UnreadableCall(
                "The upstream sent a tool call whose arguments are not a JSON object; the answer is incomplete."
            )
        return text


class UnreadableCall(ValueError):
    """A streamed tool call no Anthropic client can run (its message is the client's error)."""


# The longest the client hears nothing while a tool call's arguments are held (`StreamEncoder`).
PING_S = 5.0
_PING = _event("ping", {"type": "ping"})


class StreamEncoder:
    """OpenAI chunks → Anthropic stream events: text as it comes, in one block per run, until the
    first tool call; tool calls' arguments, and all that follows the first call's start, at the
    choice's finish.

    The first call's block starts once the call has its id and name (an upstream may send them
    after its first delta: the block had an empty id and name), which shows the answer has begun
    (a relay holding the stream until then fails over no later). Its arguments, the other calls and
    any later text are held to the finish (arguments are not read token by token): an upstream may
    send a call's arguments around text (a delta went to a block already stopped, whose stop said
    `input {}`), or arguments that are not JSON (the Anthropic SDK's `messages.stream` raised
    ValueError and the answer was lost; the answer not streamed is a 502): such a call ends the
    stream with an error event. Then the first call's arguments go in one delta and its block
    stops, the later text follows in a block of its own, then each other call whole.

    The message_delta (stop reason and usage) goes out at `[DONE]`, after the usage
    chunk, so that it carries the final token counts.
    """

    def __init__(self) -> None:
        self.events = sse.EventSplitter()
        self.started = False
        self.ended = False
        self.blocks = 0
        self.text_block: int | None = None
        self.calls: dict[int, _HeldCall] = {}  # OpenAI tool-call index → the call, held to the finish
        self.first_call: tuple[int, int] | None = None  # (tool-call index, block) of the call whose block started
        self.late_text: list[str] = []  # text after the first call's start, held to the finish
        self.tool_slots = sse.ToolCallSlots()
        self.stop_reason = "end_turn"
        self.finished = False  # the choice gave its finish_reason: nothing after it is the answer's
        self.usage: dict[str, Any] | None = None
        # Why it ended a stream the upstream ended cleanly as cut (an error class), for the relay's record.
        self.cut: str | None = None
        self._sent_at = time.monotonic()  # when it last gave the client bytes (`PING_S`)

    def __call__(self, data: bytes) -> bytes:
        events = self.events.feed(data)
        # Parts joined once: `bytes +=` copies all so far, and a replay or a whole answer fed
        # at once (a long cached answer as a stream) made it seconds of the event loop.
        out: list[bytes] = []
        for ev in events:
            payload = sse.event_data(ev)
            if payload is None or self.ended:
                continue
            if payload == b"[DONE]":
                # Without a finish_reason the answer was cut short: an error, never `end_turn`.
                if self.finished or not self.started:
                    out.append(self._end())
                else:
                    self.cut = "stream_incomplete"
                    out.append(self._fail(_CUT, {}))
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(self._read(obj))
        got = b"".join(out)
        now = time.monotonic()
        if got:
            self._sent_at = now
        elif self.first_call is not None and not self.ended and now - self._sent_at >= PING_S:
            # Arguments held to the finish (a coding agent's file, minutes long): a ping, as
            # Anthropic sends, so a proxy's or balancer's idle timeout does not cut a paid answer.
            self._sent_at = now
            return _PING
        return got

    def _read(self, obj: dict[str, Any]) -> bytes:
        started = self.started
        try:
            return self._chunk(obj)
        except _SHAPE_ERRORS:
            # The relay may hand us this chunk before it can catch anything (the held
            # head): end with an error event in Anthropic's format, never an exception
            # written into a started answer (nor one without its message_start).
            self.started = started
            self.cut = "upstream_protocol_error"
            return self._fail("The upstream sent a stream edgeroute could not read; the answer is incomplete.", obj)

    def _fail(self, message: str, obj: dict[str, Any], etype: str = "api_error") -> bytes:
        self.ended = True
        body = {"type": "error", "error": {"type": etype, "message": message}}
        return self._start(obj) + _event("error", body)

    def _start(self, obj: dict[str, Any]) -> bytes:
        if self.started:
            return b""
        self.started = True
        message = {
            "id": _message_id(obj.get("id")),
            "type": "message",
            "role": "assistant",
            "model": obj.get("model", ""),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _block(self, block: dict[str, Any], *deltas: dict[str, Any]) -> bytes:
        """A whole content block: its start, `deltas`, its stop."""
        idx = self.blocks
        self.blocks += 1
        start = {"type": "content_block_start", "index": idx, "content_block": block}
        return (
            _event("content_block_start", start)
            + b"".join(self._delta(idx, d) for d in deltas)
            + _event("content_block_stop", {"type": "content_block_stop", "index": idx})
        )

    def _text(self, text: str) -> bytes:
        """`text` as a delta of the open text block (opened first if none is)."""
        out = b""
        if self.text_block is None:
            self.text_block = self.blocks
            self.blocks += 1
            block = {"type": "text", "text": ""}
            out = _event(
                "content_block_start", {"type": "content_block_start", "index": self.text_block, "content_block": block}
            )
        return out + self._delta(self.text_block, {"type": "text_delta", "text": text})

    def _close_text(self) -> bytes:
        idx, self.text_block = self.text_block, None
        return b"" if idx is None else _event("content_block_stop", {"type": "content_block_stop", "index": idx})

    def _tool_delta(self, tc: dict[str, Any]) -> bytes:
        """Holds a tool-call delta; the first call named starts its block (the text's ends)."""
        ti = self.tool_slots.of(tc)
        if ti not in self.calls and len(self.calls) >= sse.MAX_TOOL_CALLS:
            # Each is held to the finish, then checked and written at once: 150,000 of them (from
            # an answer no relay's check saw, a whole JSON one) held the event loop for seconds.
            self.cut = "upstream_protocol_error"
            return self._fail(f"The upstream {sse.TooManyToolCalls()}; the answer is incomplete.", {})
        call = self.calls.setdefault(ti, _HeldCall())
        call.add(tc)
        if self.first_call is not None or not (call.id and call.name):
            return b""
        out = self._close_text()
        self.first_call = (ti, self.blocks)
        self.blocks += 1
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        start = {"type": "content_block_start", "index": self.first_call[1], "content_block": block}
        return out + _event("content_block_start", start)

    def _held_blocks(self, truncated: bool) -> bytes:
        """At the finish: the first call's arguments and stop, the later text, then each other call
        whole (every call checked before any goes); an error event if one cannot be run, recorded
        as the upstream's protocol error."""
        try:
            args = {ti: c.arguments(truncated) for ti, c in self.calls.items()}
        except UnreadableCall as e:
            self.cut = "upstream_protocol_error"
            return self._fail(str(e), {})
        out = [self._close_text()]
        if self.first_call is not None:
            ti, idx = self.first_call
            if first := args.pop(ti):
                out.append(self._delta(idx, {"type": "input_json_delta", "partial_json": first}))
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
        if late := "".join(self.late_text):
            out.append(self._block({"type": "text", "text": ""}, {"type": "text_delta", "text": late}))
        for ti, text in args.items():
            call = self.calls[ti]
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            out.append(self._block(block, *([{"type": "input_json_delta", "partial_json": text}] if text else [])))
        self.calls.clear()
        return b"".join(out)

    def _delta(self, idx: int, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": idx, "delta": delta})

    def _chunk(self, obj: dict[str, Any]) -> bytes:
        if obj.get("error"):
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            # may be an upstream's, relayed: an Anthropic upstream's own type (overloaded_error) kept
            etype = err.get("type")
            etype = etype if isinstance(etype, str) and etype in _ANTHROPIC_ERRORS else "api_error"
            return self._fail(redact.message(str(err.get("message", "error"))), obj, etype)
        out = self._start(obj)
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if self.finished or choice.get("index") not in (0, None):
                # An Anthropic answer is one choice's, until its finish: another choice's text
                # ("zeroFIVE"), or a second answer after the first's stop, is none of it.
                continue
            delta = choice.get("delta") or {}
            text = content_text(delta.get("content")) or delta.get("refusal")
            if text and not isinstance(text, str):
                raise UnreadableAnswer("delta content is not a string")
            if text and self.first_call is not None:
                self.late_text.append(text)
            elif text:
                out += self._text(text)
            for tc in delta.get("tool_calls") or ():
                out += self._tool_delta(tc)
                if self.ended:  # too many calls: the answer ended with an error event
                    return out
            if choice.get("finish_reason"):
                self.stop_reason = stop_reason(choice["finish_reason"], bool(self.calls))
                self.finished = True
                out += self._held_blocks(choice["finish_reason"] == "length")
        return out

    def _end(self) -> bytes:
        self.ended = True
        out = self._start({}) + self._close_text()
        u = anthropic_usage(self.usage)
        delta = {"type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": None}, "usage": u}
        return out + _event("message_delta", delta) + _event("message_stop", {"type": "message_stop"})


DIALECT = openai_api.Dialect(read=read_request, answer=answer_json, stream=StreamEncoder)


async def messages(request: web.Request) -> web.StreamResponse:
    return await openai_api.chat_completions(request, DIALECT)


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's size in tokens, as the routing core counts it for the deployment it would
    choose, its images by Anthropic's rule and a base64 PDF's pages at a page of text's typical
    count (counted against its key's RPM first, as `/v1/route/explain` is). A document that
    Anthropic fetches (a URL, a file of its Files API) is not read here: it is not counted."""
    async with free_requests.counted(request, "/v1/messages/count_tokens"):
        body = await read_request(request, counting=True)
        decision = await openai_api.decide_soon(request.app[STATE].live, body, request)
        tokens = decision.prompt_tokens
        if decision.other_parts:  # the core counts text; an image's tokens follow from its size
            # As a request's reservation does: its PDFs' object streams are inflated to be read.
            large = len(body) > media.ON_LOOP_BYTES
            tokens += await asyncio.to_thread(_media_tokens, body) if large else _media_tokens(body)
    return web.Response(body=orjson.dumps({"input_tokens": tokens}), content_type="application/json")


def _media_tokens(body: bytes) -> int:
    images = sum(media.anthropic_image_tokens(i) for i in media.body_images(body))
    return images + sum(p * media.PDF_PAGE_ESTIMATE for p in media.body_pdf_pages(body) if p is not None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def rewrite_error(resp: web.StreamResponse) -> web.StreamResponse:
    """An OpenAI-format error answer on an Anthropic path, in Anthropic's error format (the
    server's front middleware calls it for every answer on `PATHS`, so it sees every error)."""
    if resp.status < 400 or not isinstance(resp, web.Response) or resp.prepared:
        return resp
    try:
        err = orjson.loads(resp.body or b"{}").get("error")  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, AttributeError):
        return resp
    if isinstance(err, dict) and "type" in err and err.get("message") is not None:
        message = str(err["message"])
        if err.get("code") == "context_length_exceeded" and not message.startswith(_TOO_LONG):
            message = f"{_TOO_LONG}: {message}"  # what Anthropic says, and its clients look for
        resp.body = orjson.dumps({"type": "error", "error": {"type": error_type(resp.status), "message": message}})
    return resp


_TOO_LONG = "prompt is too long"


def add_routes(app: web.Application, messages_handler: Handler = messages) -> None:
    """The Anthropic routes (their errors are rewritten by `rewrite_error`). `messages_handler`
    serves `/v1/messages` (the server's passes Anthropic-only fields through)."""
    app.router.add_post("/v1/messages", messages_handler)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
