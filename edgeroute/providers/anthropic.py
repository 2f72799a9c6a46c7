"""Anthropic's Messages API (`POST /v1/messages`), behind OpenAI's chat format.

Maps system prompts, text and image content, tools and tool results, tool_choice,
`response_format` (emulated with a forced tool whose call becomes the text answer),
max_tokens, temperature (Anthropic's range is 0..1), top_p and stop; answers, finish
reasons and usage (cache reads and writes count as prompt tokens, cache reads as
cached tokens) come back in OpenAI's shape, streams event by event, tool-call
argument deltas included. `seed`, `n` > 1, penalties, logprobs and logit_bias have
no equivalent: they follow the provider's `unsupported_params` rule.

Options: `version` (anthropic-version header), `beta` (anthropic-beta header),
`default_max_tokens` (Anthropic requires max_tokens; default 4096),
`unsupported_params` (`reject` | `drop`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from edgeroute import sse
from edgeroute.outcome import Outcome
from edgeroute.providers import openai_format as oa
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.providers.error_fields import ErrorFields

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

_SUPPORTED = oa.COMMON_PARAMS | {"parallel_tool_calls"}

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def openai_usage(u: dict[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic's usage in OpenAI's terms: cache reads and writes are prompt tokens too. None
    (the answer is counted) without its output or input count (read as 0, a prompt without
    its count was priced at nothing) or with any count that is not a count:
    a careless upstream's negative count reached the client as negative `usage` (and a string
    one failed a good answer with a 502)."""
    counts = oa.token_counts(
        u, ("output_tokens", "input_tokens"), ("cache_read_input_tokens", "cache_creation_input_tokens")
    )
    if counts is None:
        return None
    output, given, cached, written = counts
    five, hour = _cache_ttls(u)
    written = max(written, five + hour)  # the breakdown, when its sum is more than the total said
    out = oa.usage(given + written + cached, output, cached, cache_write=written)
    if hour:  # priced apart (2x input, not 1.25x): Anthropic's 1-hour cache writes
        out["prompt_tokens_details"]["cache_write_1h_tokens"] = hour
    return out


def _cache_ttls(u: dict[str, Any] | None) -> tuple[int, int]:
    """The cache writes `usage.cache_creation` breaks down by lifetime (5-minute, 1-hour); (0, 0)
    without it or with a count that is not one (the total is then priced as 5-minute writes)."""
    split = u.get("cache_creation") if isinstance(u, dict) else None
    counts = oa.token_counts(split, (), ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"))
    return (counts[0], counts[1]) if counts is not None else (0, 0)


def prompt_side(u: dict[str, Any]) -> dict[str, Any] | None:
    """The prompt's counts of a stream's usage so far (message_start's: fresh input, cache reads
    and writes) with no output, before the answer's final count; None until they are in. A
    stream cut before its end is priced by them and the output counted from its text."""
    return openai_usage({**u, "output_tokens": 0}) if "input_tokens" in u else None


def image_block(url: str) -> dict[str, Any]:
    data = oa.parse_data_url(url)
    if data is not None:
        return {"type": "image", "source": {"type": "base64", "media_type": data[0], "data": data[1]}}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise oa.bad_request("Image URLs must be data: or http(s): URLs.", "messages")


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in oa.content_parts(content):
        if part["type"] == "text":
            block = {"type": "text", "text": part["text"]}
        elif part["type"] == "image_url":
            block = image_block(oa.image_url_of(part) or "")
        else:
            raise oa.bad_request("Refusal parts are only valid in assistant messages.", "messages")
        if isinstance(part.get("cache_control"), dict):
            # Prompt-caching breakpoints set by the client (as in Anthropic's own OpenAI-style SDKs).
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def convert_messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, messages) in Anthropic's form; consecutive same-role turns are merged."""
    system: list[dict[str, Any]] = []
    turns = oa.Turns()
    add = turns.add
    for role, m in oa.each_message(messages):
        if role == "system":
            text = oa.text_of(m.get("content"), "system messages")
            if text:
                system.append({"type": "text", "text": text})
        elif role == "user":
            add("user", _user_blocks(m.get("content")))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            for part in oa.content_parts(m.get("content")):
                if part["type"] == "image_url":
                    raise oa.bad_request("Assistant messages cannot hold images.", "messages")
                said = part.get("text") if part["type"] == "text" else part.get("refusal")
                if said:
                    blocks.append({"type": "text", "text": said})
            for call in m.get("tool_calls") or ():
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": oa.tool_name(call),
                        "input": oa.tool_arguments(call),
                    }
                )
            add("assistant", blocks)
        elif role == "tool":
            content = m.get("content")
            result: str | list[dict[str, Any]]
            result = content if isinstance(content, str) else _user_blocks(content)
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.get("tool_call_id"), "content": result}
            if isinstance(content, str) and content.startswith(oa.TOOL_ERROR_PREFIX):
                block["is_error"] = True  # a failed call's result, as /v1/messages marks it (anthropic_api)
            # Tool results open the user turn after the tool calls; a following user message joins it.
            add("user", [block])
    return system, turns.turns


def tools_and_choice(
    req: dict[str, Any], rule: oa.UnsupportedRule, provider: str
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """Anthropic `tools` and `tool_choice`, including JSON mode as a forced tool."""
    tools = [
        {
            "name": t["name"],
            **({"description": t["description"]} if t["description"] else {}),
            "input_schema": t["parameters"],
        }
        for t in oa.function_tools(req)
    ]
    choice: dict[str, Any] | None = None
    tc = oa.tool_choice_of(req)
    if tc is not None:
        kind, name = tc
        choice = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}.get(kind) or {
            "type": "tool",
            "name": name,
        }
    if req.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    fmt, schema = oa.response_format_of(req)
    if fmt != "text":
        if tools:
            oa.unsupported_value("response_format", "JSON mode cannot be combined with tools", rule, provider)
        else:
            tools = [
                {
                    "name": oa.JSON_TOOL,
                    "description": "Respond with the answer as JSON.",
                    "input_schema": schema or {"type": "object"},
                }
            ]
            choice = {"type": "tool", "name": oa.JSON_TOOL}
    return (tools or None), choice


class AnthropicAdapter(Adapter):
    answer_keys = ("content",)

    def _url(self) -> str:
        base = self.provider.base_url
        return base + ("/messages" if base.endswith("/v1") else "/v1/messages")

    def _auth_headers(self) -> dict[str, str]:
        h = {"anthropic-version": str(self.provider.options.get("version", API_VERSION))}
        if "beta" in self.provider.options:
            h["anthropic-beta"] = str(self.provider.options["beta"])
        if self.api_key is not None:
            h["x-api-key"] = self.api_key.reveal()
        return h

    def build(self, model: str, body: bytes, stream: bool) -> UpstreamRequest:
        req = oa.parse_request(body)
        rule = oa.unsupported_rule(self.provider.options)
        oa.apply_param_rule(req, _SUPPORTED, rule, self.name)
        system, messages = convert_messages(req["messages"])
        max_tokens = oa.max_tokens_of(req) or int(self.provider.options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        out: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
        if system:
            out["system"] = system
        temperature = oa.sampling(req, "temperature")
        if temperature is not None:
            if temperature > 1:
                oa.unsupported_value("temperature", "the range is 0 to 1", rule, self.name)
            else:
                out["temperature"] = temperature
        if (top_p := oa.sampling(req, "top_p")) is not None:
            out["top_p"] = top_p
        stop = oa.stop_list(req)
        if stop:
            out["stop_sequences"] = stop
        tools, choice = tools_and_choice(req, rule, self.name)
        if tools:
            out["tools"] = tools
        if tools and choice is not None:
            out["tool_choice"] = choice
        if isinstance(req.get("user"), str):
            out["metadata"] = {"user_id": req["user"]}
        if stream:
            out["stream"] = True
        headers = {"Content-Type": "application/json", **self.provider.headers, **self._auth_headers()}
        if stream:
            headers["Accept"] = "text/event-stream"
        return UpstreamRequest(self._url(), headers, orjson.dumps(out))

    def native_request(self, model: str, req: dict[str, Any], client_headers: dict[str, str]) -> UpstreamRequest:
        """A Messages request as an Anthropic client sent it, `model` rewritten (`/v1/messages`
        pass-through): the client's `anthropic-version` and `anthropic-beta` forwarded, the
        latter joined with the provider's own `beta` option."""
        headers = {"Content-Type": "application/json", **self.provider.headers, **self._auth_headers()}
        if v := client_headers.get("anthropic-version"):
            headers["anthropic-version"] = v
        if b := client_headers.get("anthropic-beta"):
            own = headers.get("anthropic-beta")
            headers["anthropic-beta"] = f"{own},{b}" if own else b
        if req.get("stream"):
            headers["Accept"] = "text/event-stream"
        return UpstreamRequest(self._url(), headers, orjson.dumps({**req, "model": model}))

    def judge(self, status: int, err: ErrorFields, headers: Mapping[str, str]) -> Outcome:
        if status == 529 or err.type == "overloaded_error":
            return Outcome.RATE_LIMITED
        # Anthropic gives no code for a prompt too long, only these opening words.
        if status == 400 and err.says("prompt is too long"):
            return Outcome.CONTEXT_WINDOW
        if status == 413:
            return Outcome.CLIENT_ERROR
        return super().judge(status, err, headers)

    def translate_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        reply = oa.Reply()
        content = obj.get("content") or ()
        if (why := _unreadable_content(content)) is not None:
            # A careless upstream's shape, not a bug of ours: one line, no traceback, and failed over.
            oa.log.warning("provider %s sent a Messages answer whose %s: failed over", self.name, why)
            raise sse.StreamProtocolError(f"sent a Messages answer whose {why}")
        for block in content:
            if block.get("type") == "text":
                reply.text.append(oa.text_field(block.get("text")))
            elif block.get("type") == "tool_use":
                reply.tool_use(oa.text_field(block.get("id")), oa.text_field(block.get("name")), block.get("input"))
        finish = FINISH.get(str(obj.get("stop_reason")), "stop")
        return reply.completion(
            str(obj.get("id") or oa.new_id()), str(obj.get("model", "")), finish, openai_usage(obj.get("usage"))
        )

    def stream_translator(self, model: str, include_usage: bool = False) -> AnthropicStream:
        return AnthropicStream(model, include_usage)

    def health_url(self) -> str:
        base = self.provider.base_url
        return base + ("/models" if base.endswith("/v1") else "/v1/models")

    def health_headers(self) -> dict[str, str]:
        return self._auth_headers()


def _unreadable_content(content: Any) -> str | None:
    """What makes an answer's `content` unreadable (not a list of block objects), or None."""
    if not isinstance(content, (list, tuple)):
        return f"content is not a list of blocks (a {type(content).__name__})"
    if not all(isinstance(b, dict) for b in content):
        return "content holds a content block that is not an object"
    return None


def _given_input(value: Any) -> str:
    """A tool_use block start's `input` as the call's first argument text: "" for Anthropic's own
    `{}` (its input follows in deltas), the JSON of a non-empty object, or a JSON text as it came."""
    if isinstance(value, dict) and value:
        return orjson.dumps(value).decode()
    return value if isinstance(value, str) else ""


class AnthropicStream(oa.SseJsonStream):
    """Anthropic's SSE events → OpenAI chunks; tool-use blocks become indexed tool-call deltas."""

    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.usage_in: dict[str, Any] = {}
        self.blocks: dict[int, tuple[str, int]] = {}  # block index → ("tool" | "json" | "text", tool index)
        self.args_seen: set[int] = set()
        self.stop_reason: str | None = None
        self.output_reported = False  # a message_delta carried the answer's output_tokens
        self.message = False  # its message_start came

    @property
    def prompt_usage(self) -> dict[str, Any] | None:
        return prompt_side(self.usage_in)

    def on_event(self, ev: dict[str, Any]) -> bytes:
        kind = ev.get("type")
        w = self.out
        if kind == "message_start":
            if self.message:
                # Two answers spliced in one stream ("AAABBB", billed for the second's prompt):
                # the upstream's protocol error (before content it fails over).
                return w.spliced()
            self.message = True
            msg = ev.get("message") or {}
            if msg.get("id"):
                w.id = str(msg["id"])
            if msg.get("model"):
                w.model = str(msg["model"])
            self.usage_in = dict(msg.get("usage") or {})
            return w.start()
        if kind == "content_block_start":
            idx = int(ev.get("index", 0))
            block = ev.get("content_block") or {}
            # A gateway may give a call's input whole in its start, with no deltas after it.
            given = _given_input(block.get("input"))
            if given:
                self.args_seen.add(idx)
            if block.get("type") == "tool_use" and block.get("name") == oa.JSON_TOOL:
                self.blocks[idx] = ("json", -1)
                return w.text(given)
            elif block.get("type") == "tool_use":
                ti = w.new_tool()
                self.blocks[idx] = ("tool", ti)
                return w.tool_head(ti, oa.text_field(block.get("id")), oa.text_field(block.get("name")), given)
            elif block.get("type") == "text":
                self.blocks[idx] = ("text", -1)
                return w.text(str(block.get("text") or ""))
            return b""
        if kind == "content_block_delta":
            idx = int(ev.get("index", 0))
            delta = ev.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                return w.text(oa.text_field(delta.get("text")))
            if dtype == "input_json_delta":
                frag = str(delta.get("partial_json", ""))
                what, ti = self.blocks.get(idx, ("", -1))
                if frag:
                    self.args_seen.add(idx)
                if what == "json":
                    return w.text(frag)
                if what == "tool":
                    return w.tool_args(ti, frag)
            return b""  # thinking, signature and citation deltas have no OpenAI equivalent
        if kind == "content_block_stop":
            idx = int(ev.get("index", 0))
            what, ti = self.blocks.get(idx, ("", -1))
            if idx not in self.args_seen and what in ("tool", "json"):
                # A call without arguments: OpenAI clients expect a JSON object, not "".
                return w.tool_args(ti, "{}") if what == "tool" else w.text("{}")
            return b""
        if kind == "message_delta":
            delta = ev.get("delta") or {}
            if delta.get("stop_reason"):
                self.stop_reason = str(delta["stop_reason"])
            delta_usage = ev.get("usage") or {}
            self.usage_in.update({k: v for k, v in delta_usage.items() if v is not None})
            # message_start's output count is provisional (1): without the final one, counted.
            self.output_reported = self.output_reported or type(delta_usage.get("output_tokens")) is int
            w.usage = openai_usage(self.usage_in) if self.output_reported else None
            if self.stop_reason is None:
                return b""
            json_only = any(what == "json" for what, _ in self.blocks.values())
            reason = "stop" if json_only and self.stop_reason == "tool_use" else FINISH.get(self.stop_reason, "stop")
            return w.finish(reason)
        if kind == "message_stop":
            w.usage = openai_usage(self.usage_in) if self.output_reported else None
            return w.finish("stop") + w.end()
        if kind == "error":
            err = ev.get("error") or {}
            return oa.error_event(str(err.get("message", "upstream error")), str(err.get("type", "upstream_error")))
        return b""  # ping and future event types
