"""The Responses API's request and answer, translated to and from Chat Completions.

For deployments that speak only chat: the request's `instructions`, `input` items
(messages with text and image parts, function calls and their outputs), function
tools, `tool_choice`, `text.format` and sampling parameters become a chat body; a chat
completion becomes a Response (a message of `output_text`, `function_call` items,
usage, `incomplete` when the answer was cut). What chat cannot carry (built-in tools,
`previous_response_id`, ...) is a 400 naming the parameter, never silently dropped.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import orjson

from edgeroute import sse
from edgeroute.accounting import Usage
from edgeroute.endpoints.pipeline import bad

# Parameters that have a chat meaning (or none needed), checked and translated below.
_TRANSLATED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "user",
        "metadata",
        "store",
        "truncation",
        "stream_options",
    }
)
_PREFIX = os.urandom(3).hex()
_ids = itertools.count(1)


def new_id(kind: str) -> str:
    return f"{kind}_{_PREFIX}{next(_ids):010x}"


def _text_parts(content: Any, where: str) -> Any:
    """A message's content as chat content: a string, or a list of text and image parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or an array of content parts.", "input")
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            out.append({"type": "image_url", "image_url": image})
        else:
            raise bad(f"'{where}.content[{j}]' is a content part this deployment cannot take ({kind!r}).", "input")
    return out


def _flat(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def input_messages(raw: Any) -> list[dict[str, Any]]:
    """The `input` as chat messages."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("'input' must be a non-empty string or array of input items.", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad(f"'input[{i}]' must be an object.", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad(f"'input[{i}].role' must be user, assistant, system or developer.", "input")
            content = _text_parts(item.get("content"), f"input[{i}]")
            if role == "assistant":
                out.append({"role": "assistant", "content": _flat(content)})
            else:
                out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call_id, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            if not all(isinstance(v, str) for v in (call_id, name, args)):
                raise bad(f"'input[{i}]' (function_call) needs call_id, name and arguments strings.", "input")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant" and "tool_calls" in prev:
                prev["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str | list):
                raise bad(f"'input[{i}]' (function_call_output) needs call_id and output.", "input")
            parts = output if isinstance(output, str) else _text_parts(output, f"input[{i}]")
            if not isinstance(parts, str) and any(p["type"] != "text" for p in parts):
                # A chat tool message holds text alone: the image would be dropped unseen.
                raise bad(
                    f"'input[{i}].output' has an image, which a chat deployment's tool result cannot take.", "input"
                )
            out.append({"role": "tool", "tool_call_id": call_id, "content": _flat(parts)})
        elif kind == "reasoning":
            continue  # a previous answer's reasoning summary: chat has no place for it
        else:
            raise bad(f"'input[{i}]' has type {kind!r}, which a chat deployment cannot take.", "input")
    return out


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad("'tools' must be an array.", "tools")
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("name"), str):
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad(f"'tools[{i}]' ({kind!r}): only function tools can be served by chat deployments.", "tools")
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object"}}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        if isinstance(t.get("strict"), bool):
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any) -> Any:
    if raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return {"type": "function", "function": {"name": raw["name"]}}
    raise bad("'tool_choice' must be auto, none, required or a function by name.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None or fmt == {"type": "text"}:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {"name": fmt.get("name") or "response", "schema": fmt["schema"]}
        if isinstance(fmt.get("strict"), bool):
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise bad("'text.format' must be text, json_object or json_schema.", "text")


def to_chat(req: dict[str, Any]) -> dict[str, Any]:
    """A checked Responses request as a chat-completions body (the client's model kept)."""
    for name in sorted(set(req) - _TRANSLATED):
        if req[name] not in (None, [], {}):  # an empty `include` or `tools` asks for nothing
            raise bad(f"'{name}' cannot be served by a chat deployment (only by one that speaks Responses).", name)
    messages = input_messages(req.get("input"))
    instructions = req.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string.", "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    body: dict[str, Any] = {"model": req["model"], "messages": messages}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
        if req.get(ours) is not None:
            body[theirs] = req[ours]
    if req.get("user") is not None:
        body["user"] = req["user"]
    if req.get("tools"):
        body["tools"] = _tools(req["tools"])
        if req.get("parallel_tool_calls") is not None:
            body["parallel_tool_calls"] = req["parallel_tool_calls"]
    if req.get("tool_choice") is not None:
        body["tool_choice"] = _tool_choice(req["tool_choice"])
    if (fmt := _response_format(req.get("text"))) is not None:
        body["response_format"] = fmt
    if req.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # for the usage of `response.completed`
    return body


def chat_usage(u: Usage) -> dict[str, Any]:
    """A usage edgeroute counted, as a chat answer reports one (for `usage_from_chat`)."""
    details = {"cached_tokens": u.cached_tokens}
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "prompt_tokens_details": details,
    }


def usage_from_chat(u: Any) -> dict[str, Any]:
    u = u if isinstance(u, dict) else {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((u.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def output_text(output: Any) -> str:
    """What the model wrote in a Response's `output`: message text and refusals, function
    call arguments, reasoning summaries (for counting an answer that reports no usage)."""
    parts: list[str] = []
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
        for key in ("content", "summary"):
            for part in item[key] if isinstance(item.get(key), list) else ():
                if isinstance(part, dict):
                    parts += [part[k] for k in ("text", "refusal") if isinstance(part.get(k), str)]
    return "".join(parts)


def usage_to_chat(u: Any) -> dict[str, Any] | None:
    """A Response's usage in chat's shape (what accounting reads); None when absent."""
    if not isinstance(u, dict):
        return None
    details = u.get("input_tokens_details")
    # Details that are not an object (an odd server's `"x"`) are absent: a complete answer was
    # failed (an AttributeError: retried and paid again, then a 502) for a field it need not read.
    cached = (details.get("cached_tokens") if isinstance(details, dict) else None) or 0
    return {
        "prompt_tokens": u.get("input_tokens"),
        "completion_tokens": u.get("output_tokens"),
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _counts(u: dict[str, Any]) -> dict[str, Any]:
    return {"prompt_tokens": u.get("input_tokens"), "completion_tokens": u.get("output_tokens"),
            "total_tokens": u.get("total_tokens")}  # fmt: skip


def absurd_usage(u: Any) -> bool:
    """Whether a Response's `usage` holds a count no answer has (`sse.absurd_usage`: negative,
    1e15): relayed, it reached apps that bill their users from it."""
    return isinstance(u, dict) and sse.absurd_usage(_counts(u))


def repaired_usage(u: dict[str, Any]) -> dict[str, Any] | None:
    """An absurd Response `usage` whose input and output counts are sound, with the total they
    make (`sse.repaired_usage`); None when those are garbage too (counted instead)."""
    repaired = sse.repaired_usage(_counts(u))
    return None if repaired is None else {**u, "total_tokens": repaired["total_tokens"]}


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def response_object(
    req: dict[str, Any],
    rid: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    finish: str | None = None,
) -> dict[str, Any]:
    """A Response object echoing the request's settings, as OpenAI's does."""
    reason = _INCOMPLETE.get(finish or "")
    if reason is not None and status == "completed":
        status = "incomplete"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": req["model"],
        "output": output,
        "parallel_tool_calls": req.get("parallel_tool_calls", True),
        "tool_choice": req.get("tool_choice") or "auto",
        "tools": req.get("tools") or [],
        "error": None,
        "incomplete_details": {"reason": reason} if reason is not None else None,
        "instructions": req.get("instructions"),
        "metadata": req.get("metadata") or {},
        "max_output_tokens": req.get("max_output_tokens"),
        "temperature": req.get("temperature"),
        "top_p": req.get("top_p"),
        "text": req.get("text") or {"format": {"type": "text"}},
        "usage": usage,
    }


def message_item(mid: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": [part]}


def call_item(fid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": fid,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def from_chat(req: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as the Response to `req`."""
    choice = (chat.get("choices") or [{}])[0]
    msg = choice.get("message") or {} if isinstance(choice, dict) else {}
    output: list[dict[str, Any]] = []
    text = msg.get("content") or msg.get("refusal")
    if isinstance(text, str) and text:
        output.append(message_item(new_id("msg"), text))
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function") or {} if isinstance(tc, dict) else {}
        output.append(
            call_item(
                new_id("fc"), str(tc.get("id") or new_id("call")), str(fn.get("name")), str(fn.get("arguments") or "{}")
            )
        )
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return response_object(req, new_id("resp"), "completed", output, usage_from_chat(chat.get("usage")), finish)


def dumps(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)
