"""OpenAI's chat format, read and written by the translating adapters.

One place for what every non-pass-through adapter needs: reading the client's
OpenAI-format request (messages, content parts, data URLs, tools), the rule for
parameters a provider cannot honour (drop or reject, never corrupt), OpenAI's
`usage` object (the one currency cost is computed in), and the writer of
`chat.completion.chunk` SSE events that stream translators emit.

It must not know any provider's format.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import orjson

from edgeroute import sse
from edgeroute.errors import ProxyError

log = logging.getLogger("edgeroute.dispatch")

# The tool used to emulate `response_format` (JSON mode) on providers whose only
# structured output is a forced tool call; its call is turned back into text content.
JSON_TOOL = "edgeroute_json_response"
# A tool result the client marked as a failure (Anthropic's `tool_result.is_error`) has no field
# in OpenAI's tool message: its content opens with this, which the model reads, and which the
# Anthropic adapter turns back into `is_error`.
TOOL_ERROR_PREFIX = "Error: "

# Parameters that carry no meaning for the answer (identifiers, storage flags) or that
# each adapter reads itself: never subject to the unsupported-parameter rule.
_ALWAYS_OK = frozenset({"model", "messages", "stream", "stream_options", "user", "store", "metadata", "service_tier"})

# A parameter set to its neutral value asks nothing of the provider.
_NEUTRAL: dict[str, object] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
}

UnsupportedRule = Literal["drop", "reject"]


def bad_request(message: str, param: str | None = None, code: str = "invalid_request") -> ProxyError:
    return ProxyError(400, message, code=code, param=param)


def parse_request(body: bytes) -> dict[str, Any]:
    """The client's request as a dict; a 400 when it is not a JSON object with messages."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        raise bad_request("The request must be a JSON object with a `messages` array.", "messages")
    return req


def unsupported_rule(options: Mapping[str, Any]) -> UnsupportedRule:
    rule = options.get("unsupported_params", "reject")
    if rule not in ("drop", "reject"):
        raise ValueError("options.unsupported_params must be 'drop' or 'reject'")
    return "drop" if rule == "drop" else "reject"


def apply_param_rule(req: dict[str, Any], supported: Iterable[str], rule: UnsupportedRule, provider: str) -> list[str]:
    """Removes the parameters `provider` cannot honour (rule `drop`) or raises a 400 (rule `reject`).

    Returns the names dropped. A parameter left at its neutral value is always accepted.
    """
    ok = _ALWAYS_OK.union(supported)
    dropped = []
    for name in list(req):
        value = req[name]
        if name in ok or value is None or (name in _NEUTRAL and value == _NEUTRAL[name]):
            continue
        if rule == "reject":
            raise bad_request(
                f"The parameter `{name}` is not supported by the provider serving this model ({provider}).",
                name,
                "unsupported_parameter",
            )
        del req[name]
        dropped.append(name)
    return dropped


# OpenAI's own ranges for its sampling parameters: a value outside them is the client's
# mistake whatever the provider, answered as OpenAI answers it rather than sent on.
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def sampling(req: dict[str, Any], param: str) -> float | int | None:
    """A sampling parameter of a request translated for another provider: None when absent, a
    400 naming it when it is not a number (true is not 1) or outside OpenAI's range for it."""
    v = req.get(param)
    if v is None:
        return None
    lo, hi = SAMPLING_RANGES[param]
    if type(v) not in (int, float) or not lo <= v <= hi:
        raise bad_request(f"`{param}` must be a number from {lo:g} to {hi:g}.", param)
    return v  # type: ignore[no-any-return]


def unsupported_value(param: str, why: str, rule: UnsupportedRule, provider: str) -> None:
    """For a supported parameter with a value the provider cannot honour: raises under `reject`."""
    if rule == "reject":
        raise bad_request(
            f"The value of `{param}` is not supported by the provider serving this model ({provider}): {why}.",
            param,
            "unsupported_parameter",
        )


def max_tokens_of(req: Mapping[str, Any]) -> int | None:
    value = req.get("max_completion_tokens", req.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad_request("`max_tokens` must be a positive integer.", "max_tokens")
    return value


def stop_list(req: Mapping[str, Any]) -> list[str] | None:
    stop = req.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise bad_request("`stop` must be a string or an array of strings.", "stop")


# Request parameters every translating adapter maps; each adds its own extras.
COMMON_PARAMS = frozenset(
    {"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools", "tool_choice", "response_format"}
)


def each_message(messages: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, message) for each OpenAI message, `developer` read as `system`; a message
    that is not an object or has a role no provider knows is a 400."""
    for m in messages:
        if not isinstance(m, dict):
            raise bad_request("Every message must be an object.", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad_request(f"Unsupported message role {role!r}.", "messages")
        yield ("system" if role == "developer" else role), m


class Turns:
    """A provider's conversation turns, built in order. Consecutive turns of one role are
    merged, since Anthropic, Gemini and Bedrock want user and assistant turns to alternate."""

    def __init__(self, key: str = "content") -> None:
        self.key = key  # where a turn keeps its blocks: "content", or Gemini's "parts"
        self.turns: list[dict[str, Any]] = []

    def add(self, role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if self.turns and self.turns[-1]["role"] == role:
            self.turns[-1][self.key].extend(blocks)
        else:
            self.turns.append({"role": role, self.key: blocks})


def text_of(content: Any, where: str = "messages") -> str:
    """The text of a message whose content must be text (a string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"Only text content is supported in {where}.", "messages")
            out.append(part["text"])
        return "\n".join(out) if len(out) > 1 else "".join(out)
    raise bad_request("Message `content` must be a string or an array of content parts.", "messages")


def content_parts(content: Any) -> list[dict[str, Any]]:
    """A message's content as a list of OpenAI content parts (a string becomes one text part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request("Every content part must be an object with a `type`.", "messages")
            kind = part["type"]
            if kind == "text" and not isinstance(part.get("text"), str):
                raise bad_request("A text part needs a string `text`.", "messages")
            if kind == "image_url" and not isinstance(image_url_of(part), str):
                raise bad_request("An image_url part needs `image_url.url`.", "messages")
            if kind not in ("text", "image_url", "refusal"):
                raise bad_request(f"Content parts of type `{kind}` are not supported by this provider.", "messages")
        return [p for p in content if p["type"] != "text" or p["text"]]
    raise bad_request("Message `content` must be a string or an array of content parts.", "messages")


def image_url_of(part: Mapping[str, Any]) -> str | None:
    img = part.get("image_url")
    url = img.get("url") if isinstance(img, dict) else img
    return url if isinstance(url, str) else None


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL; None for any other URL."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_request("Image data URLs must be base64-encoded (data:<type>;base64,...).", "messages")
    media = head[: -len(";base64")] or "application/octet-stream"
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("An image data URL holds invalid base64.", "messages") from None
    return media, data


def tool_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed arguments of an assistant tool call from the conversation history."""
    fn = call.get("function")
    raw = fn.get("arguments") if isinstance(fn, dict) else None
    if raw is None or raw == "":
        return {}
    try:
        args = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        raise bad_request("A tool call's `arguments` is not valid JSON.", "messages") from None
    if not isinstance(args, dict):
        raise bad_request("A tool call's `arguments` must be a JSON object.", "messages")
    return args


def tool_name(call: Mapping[str, Any]) -> str:
    fn = call.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request("A tool call needs `function.name`.", "messages")
    return name


def function_tools(req: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools as `{name, description, parameters}` (a 400 for other tool types)."""
    tools = req.get("tools") or []
    if not isinstance(tools, list):  # `true` or a number was a TypeError: our 500 for the client's mistake
        raise bad_request("`tools` must be a list of tools.", "tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise bad_request("Only tools of type `function` are supported by this provider.", "tools")
        fn = t["function"]
        if not isinstance(fn.get("name"), str):
            raise bad_request("A function tool needs a `name`.", "tools")
        # Sent on as the provider's schema, a string or a list failed at the upstream (a 500
        # at some, retried and answered as our 502) for the client's mistake.
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_request("A function tool's `parameters` must be a JSON Schema object.", "tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad_request("A function tool's `description` must be a string.", "tools")
        out.append(
            {
                "name": fn["name"],
                "description": fn.get("description"),
                "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
            }
        )
    return out


ToolChoice = tuple[Literal["auto", "none", "required", "function"], str | None]


def tool_choice_of(req: Mapping[str, Any]) -> ToolChoice | None:
    tc = req.get("tool_choice")
    if tc is None:
        return None
    if tc in ("auto", "none", "required"):
        return tc, None
    if isinstance(tc, dict) and tc.get("type") == "function" and isinstance(tc.get("function"), dict):
        name = tc["function"].get("name")
        if isinstance(name, str):
            return "function", name
    raise bad_request("`tool_choice` must be auto, none, required or a named function.", "tool_choice")


def response_format_of(req: Mapping[str, Any]) -> tuple[Literal["text", "json_object", "json_schema"], dict[str, Any]]:
    """The requested output format and, for json_schema, the schema."""
    rf = req.get("response_format")
    if rf is None:
        return "text", {}
    if isinstance(rf, dict) and rf.get("type") in ("text", "json_object"):
        return rf["type"], {}
    if isinstance(rf, dict) and rf.get("type") == "json_schema" and isinstance(rf.get("json_schema"), dict):
        schema = rf["json_schema"].get("schema")
        return "json_schema", schema if isinstance(schema, dict) else {"type": "object"}
    raise bad_request("`response_format` must be text, json_object or json_schema.", "response_format")


def token_counts(u: Any, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[int] | None:
    """A native usage object's counts (`required` then `optional`, an absent optional one 0), or
    None when it is not an object, a required count is missing, or any count is not a count:
    the caller then counts the answer itself. Read as 0, a careless upstream's missing output
    count priced a long answer as its prompt alone, and a string count failed a good answer."""
    if not isinstance(u, dict):
        return None
    out = []
    for key in required + optional:
        v = u.get(key)
        if v is None and key in optional:
            v = 0
        if type(v) is not int or not 0 <= v < 1 << 40:
            return None
        out.append(v)
    return out


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0, cache_write: int = 0) -> dict[str, Any]:
    """OpenAI's `usage`: `prompt_tokens` includes cached tokens and cache writes (Anthropic's,
    Bedrock's: `prompt_tokens_details.cache_write_tokens`, priced as such); `completion_tokens`
    includes reasoning."""
    details: dict[str, int] = {"cached_tokens": cached, "audio_tokens": 0}
    if cache_write:
        details["cache_write_tokens"] = cache_write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + os.urandom(12).hex()


def completion(
    cid: str,
    model: str,
    text: str | None,
    tool_calls: list[dict[str, Any]],
    finish: str,
    use: dict[str, Any] | None,
) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
        "refusal": None,
        "annotations": [],
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if use is not None:
        out["usage"] = use
    return out


def text_field(value: Any) -> str:
    """A text field of an upstream's answer (text, a tool's name or id) as a string: a careless
    upstream's `null` is empty, where `str()` showed the client the word "None"."""
    if isinstance(value, str):
        return value
    return "" if value is None else str(value)


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class Reply:
    """An answer's text and tool calls, gathered from a provider's content blocks.

    A call of the forced JSON tool (how adapters serve `response_format` where the
    provider has no JSON mode) is the answer's text, and the answer then ends with `stop`.
    """

    def __init__(self) -> None:
        self.text: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self.json_answer = False

    def tool_use(self, call_id: str, name: str, arguments: Any) -> None:
        # An input given as JSON text (a gateway's) is the arguments' text, not a string to quote.
        args = arguments if isinstance(arguments, str) and arguments else orjson.dumps(arguments or {}).decode()
        if name == JSON_TOOL:
            self.text.append(args)
            self.json_answer = True
        else:
            self.calls.append(tool_call(call_id, name, args))

    def completion(self, cid: str, model: str, finish: str, use: dict[str, Any] | None) -> dict[str, Any]:
        stop = self.json_answer or (finish == "tool_calls" and not self.calls)  # see `ChunkWriter.finish`
        return completion(cid, model, "".join(self.text), self.calls, "stop" if stop else finish, use)


SPLICED = sse.SPLICED_MESSAGE


def error_event(message: str, etype: str, code: str | None = None) -> bytes:
    return (
        b"data: " + orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}}) + b"\n\n"
    )


# The error `type` OpenAI's and Anthropic's clients both read for an HTTP status (an Anthropic
# client's SDK raises its class by it; `in_band_status` reads the status back for the failover).
_STATUS_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def status_error_event(message: str, status: int, code: str) -> bytes:
    """A native provider's in-stream error (Gemini's error chunk, Bedrock's exception frame) as an
    OpenAI-format error event of the class its `status` stands for, with the provider's own
    `code`: as an OpenAI or Anthropic upstream's error event is (a rate limit before content fails
    over as one, a validation error is the client's; after content the client's SDK reads
    `rate_limit_error`, not `RESOURCE_EXHAUSTED`)."""
    return error_event(
        message, _STATUS_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error"), code
    )


class ChunkWriter:
    """Writes one stream's `chat.completion.chunk` events, in the order OpenAI sends them.

    Tool calls are numbered as OpenAI numbers them (0, 1, ... among tool calls only),
    whatever the provider's block numbering; `usage` is kept for accounting even when
    the client did not ask for a usage chunk.
    """

    def __init__(self, model: str, include_usage: bool, cid: str | None = None) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = cid or new_id()
        self.created = int(time.time())
        self.usage: dict[str, Any] | None = None
        self.started = False
        self.finished = False
        self.done = False
        self.tools = 0
        self.late = False  # the upstream went on after its finish (logged once)
        # A second answer's start ended it (`spliced`): the relay charges no health for it,
        # as for a chat chunk of another completion (`sse.ChatChunks.ended`).
        self.cut_for_splice = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._chunk({"role": "assistant", "content": "", "refusal": None})

    def _after_finish(self) -> bool:
        """Whether the answer has ended (its finish went out): what an upstream sends after it (text
        after Anthropic's `message_delta`, Bedrock's `messageStop`) is none of the answer, as a chat
        stream's after its `finish_reason` is not. Relayed, the client's text was "abcLATE" while the
        cache kept "abc"."""
        if self.finished and not self.late:
            self.late = True
            log.warning("an upstream of model %s went on after its answer's finish: dropped", self.model)
        return self.finished

    def text(self, text: str) -> bytes:
        if not text or self._after_finish():
            return b""
        return self.start() + self._chunk({"content": text})

    def new_tool(self) -> int:
        """The OpenAI index of the next tool call; emit it with :meth:`tool_head`. Past
        `sse.MAX_TOOL_CALLS`, the upstream's protocol error (`sse.TooManyToolCalls`)."""
        if self.tools >= sse.MAX_TOOL_CALLS:
            raise sse.TooManyToolCalls()
        self.tools += 1
        return self.tools - 1

    def tool_head(self, index: int, call_id: str, name: str, arguments: str = "") -> bytes:
        if self._after_finish():
            return b""
        head = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        return self.start() + self._chunk({"tool_calls": [head]})

    def tool_args(self, index: int, fragment: str) -> bytes:
        if not fragment or self._after_finish():
            return b""
        return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def spliced(self) -> bytes:
        """The error event that ends a stream into which the upstream spliced a second answer (a
        second message start): before content the attempt fails over on it, after it the client
        gets it. Nothing after it is read. (Sent in the stream, not raised, so that the answer's
        events read with it go first, wherever the reads split.)"""
        self.done = self.cut_for_splice = True
        return error_event(SPLICED, "upstream_error", "upstream_protocol_error")

    def finish(self, reason: str) -> bytes:
        if self.finished:
            return b""
        self.finished = True
        if reason == "tool_calls" and not self.tools:
            # A provider's tool_use stop with no call (a gateway's): `tool_calls` with none sent
            # an OpenAI client's loop over `message.tool_calls` (None) into a TypeError.
            reason = "stop"
        return self.start() + self._chunk({}, reason)

    def end(self) -> bytes:
        """The usage chunk (when asked for) and `[DONE]`."""
        if self.done:
            return b""
        self.done = True
        out = b""
        if self.include_usage and self.usage is not None:
            obj = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage,
            }
            out += b"data: " + orjson.dumps(obj) + b"\n\n"
        return out + b"data: [DONE]\n\n"


class SseJsonStream:
    """Base of translators for providers whose streams are SSE events carrying JSON:
    splits events across chunk boundaries, decodes each, and hands it to `on_event`."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.out = ChunkWriter(model, include_usage)
        self.events = sse.EventSplitter(error_limit=sse.HOLD_BYTES)

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.out.usage

    def feed(self, chunk: bytes) -> bytes:
        events = self.events.feed(chunk)
        out: list[bytes] = []  # joined once: a whole answer fed at once must not be quadratic
        for ev in events:
            if self.out.done:  # ended: what an upstream sends after it (another answer) is not read
                break
            data = sse.event_data(ev)
            if not data:
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                out.append(error_event("upstream sent a malformed stream event", "upstream_error"))
                break
            if isinstance(obj, dict):
                out.append(self.on_event(obj))
        return b"".join(out)

    def on_event(self, obj: dict[str, Any]) -> bytes:
        raise NotImplementedError
