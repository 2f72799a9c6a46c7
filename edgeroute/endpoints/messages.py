"""`POST /v1/messages` with what only Anthropic understands: passed through, never dropped.

A Messages request that the chat translation would lose something of (`thinking`,
`top_k`, `cache_control` anywhere, thinking blocks in the history, metadata beyond
`user_id`, `output_config.effort`, `service_tier`, `container`, `mcp_servers`, any field
the translation does not know, or an `anthropic-beta` header) is served here; any other
goes the chat pipeline's way (`anthropic_api`), unchanged.

An Anthropic deployment gets the request as sent (`model` rewritten, the client's
`anthropic-beta` and `anthropic-version` forwarded), and its answer and events reach the
client unchanged. Another deployment cannot honour those fields: by its provider's
`unsupported_params` rule the request is refused (400 naming them and the deployment,
the default) or served through chat without them (`drop`), the answer then carrying
`x-edgeroute-dropped-params`. Either way the core decides on the chat translation.

`document` blocks come here too: an Anthropic deployment gets them as sent; another gets their
chat translation (`anthropic_api`: nothing is lost, whatever its rule), except a document by
URL or Files API id, which only Anthropic reads: a 400 naming it, `drop` or not.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core, anthropic_api, large_json, sse
from edgeroute.accounting import (
    Usage,
    anthropic_server_tools,
    anthropic_tool_calls,
    count_server_tool,
    with_tool_calls,
)
from edgeroute.cost.media import items_media
from edgeroute.cost.prices import reachable_deployments
from edgeroute.cost.tool_calls import anthropic_tools, with_tools
from edgeroute.dispatch import Call, Failure, JsonAnswer, StreamAnswer, side_effects
from edgeroute.dispatch.attempt import PARSE_ON_LOOP_BYTES
from edgeroute.endpoints import container_owners as containers
from edgeroute.endpoints.pipeline import Parsed, answer_object, serve
from edgeroute.endpoints.responses import Via
from edgeroute.errors import ProxyError
from edgeroute.providers.anthropic import AnthropicAdapter, openai_usage, prompt_side
from edgeroute.providers.base import Adapter, StreamTranslator, UpstreamRequest
from edgeroute.request_input import read_body
from edgeroute.state import STATE, Live
from edgeroute.upstream import DeploymentInfo
from edgeroute.upstream_http.response import Response

SENTINEL = b"data: [DONE]\n\n"
_TRANSLATED = frozenset(
    {
        "model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "metadata", "tools",
        "tool_choice", "output_config", "stream",
    }
)  # fmt: skip
_CONTENT = frozenset({"content_block_delta", "message_delta", "message_stop"})
# What each event the SDK accumulates must carry, as an object (`NativeStream._check`).
_EVENT_FIELDS = {"message_start": "message", "content_block_start": "content_block", "content_block_delta": "delta",
                 "message_delta": "delta"}  # fmt: skip


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


def lost_fields(req: dict[str, Any], beta: str | None) -> list[str]:
    """What the chat translation of `req` would lose."""
    lost = {k for k, v in req.items() if k not in _TRANSLATED and v is not None}
    metadata, output_config = req.get("metadata"), req.get("output_config")
    if isinstance(metadata, dict) and set(metadata) - {"user_id"}:
        lost.add("metadata")
    if isinstance(output_config, dict) and set(output_config) - {"format"}:
        lost.add("output_config")
    tools = req.get("tools")
    if isinstance(tools, list) and any(anthropic_api.is_anthropic_tool(t) for t in tools):
        lost.add("tools")  # Anthropic's server tools (web search): only Anthropic runs them
    if any(_has_key(req.get(k), "cache_control") for k in ("system", "messages", "tools")):
        lost.add("cache_control")
    history = req.get("messages")
    for m in history if isinstance(history, list) else ():  # a bad shape is to_openai's 400
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking") for b in content
        ):
            lost.add("thinking")
        if isinstance(content, list):  # a server tool's turns (web search, code execution): Anthropic's own
            lost.update(str(b["type"]) for b in content if anthropic_api.is_server_block(b))
            lost.update(_document_fields(content))
    if beta:
        lost.add("anthropic-beta")
    return sorted(lost)


def _document_fields(content: list[Any]) -> set[str]:
    """`document` for a turn's documents (an Anthropic deployment gets them as sent, a chat one
    their translation), and `citations` for those that ask for them (only Anthropic cites)."""
    found: set[str] = set()
    for b in content:
        if anthropic_api.tool_result_media(b):
            found.add("tool_result")  # with an image or a document: Anthropic reads it back
        if isinstance(b, dict) and b.get("type") == "document":
            found.add("document")
            citations = b.get("citations")
            if isinstance(citations, dict) and citations.get("enabled"):
                found.add("citations")
    return found


def _untranslatable(req: dict[str, Any]) -> list[str]:
    """What a chat deployment cannot read of the request's documents, as said in a refusal."""
    found = []
    for i, m in enumerate(req.get("messages") or ()):
        content = m.get("content") if isinstance(m, dict) else None
        for j, b in enumerate(content if isinstance(content, list) else ()):
            if (why := anthropic_api.untranslatable_document(b)) is not None:
                found.append(f"messages.{i}.content.{j} (a document whose source is {why}: send it as base64 or text)")
            elif anthropic_api.tool_result_media(b):
                found.append(f"messages.{i}.content.{j} (a tool_result holding images or documents: a chat tool"
                             " message holds text only)")  # fmt: skip
    return found


def has_content(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type")
    block = obj.get("content_block") or {}
    return kind in _CONTENT or (kind == "content_block_start" and block.get("type") != "text")


def _chat_error(message: str, kind: Any) -> bytes:
    """An Anthropic error event before content as the chat error `in_band_failure` reads: its
    `type` kept, which classifies it (a client's invalid request is not a server error)."""
    err = {"message": message, "code": "upstream_error"} | ({"type": kind} if isinstance(kind, str) else {})
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


# An Anthropic usage's counts, and the bound past which a count is garbage (as `sse.MAX_COUNT`).
_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _absurd_counts(usage: Any) -> list[str]:
    """The counts of an Anthropic `usage` no answer has (negative, 1e15, not an integer): relayed
    as they came, they reached apps that bill their users from `usage` (the ledger counts instead)."""
    if not isinstance(usage, dict):
        return []
    return [k for k in _COUNTS if k in usage and not (type(usage[k]) is int and 0 <= usage[k] < sse.MAX_COUNT)]


def _usage_event(usage: dict[str, Any] | None) -> bytes:
    """For the ledger only (the relay reads the last `usage`; the client never sees it)."""
    return b"data: " + orjson.dumps({"usage": usage}) + b"\n\n" if usage else b""


def _answer_text(content: Any) -> str:
    """What the model wrote in a Messages answer: text, thinking and tool inputs."""
    parts: list[str] = []
    for b in content if isinstance(content, list) else ():
        if not isinstance(b, dict):
            continue
        for k in ("text", "thinking"):
            if isinstance(b.get(k), str):
                parts.append(b[k])
        if b.get("type") == "tool_use" and b.get("input") is not None:
            parts.append(orjson.dumps(b["input"]).decode())
    return "".join(parts)


class NativeStream:
    """An Anthropic upstream's events, relayed as they are (see `responses_stream` for the protocol)."""

    def __init__(self) -> None:
        self._events = sse.EventSplitter(error_limit=sse.HOLD_BYTES)
        self._content = False
        self._usage_in: dict[str, Any] = {}
        self._final = False  # a message_delta brought the answer's output_tokens
        self._blocks = 0  # content blocks started
        self.tool_calls_seen: dict[str, int] = {}  # server tool calls started, for a stream cut before its end
        self.containers: set[str] = set()  # the code execution containers it named, bound to the caller
        # The files code execution wrote (`container_owners.output_files`), bound once it has ended.
        self.files: set[str] = set()
        self.ended = False  # its message_stop was read: the answer was given whole

    def _check(self, obj: Any) -> None:
        """An event the Anthropic SDK can read: relayed unchanged, an upstream's `data: [1]`, a
        null `delta` or a delta to a block never started crashed the client's stream with a
        TypeError, AttributeError or IndexError (no API error its code handles). Such an event
        is the upstream's unreadable stream: the relay ends it with an error event."""
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str):
            raise anthropic_api.UnreadableAnswer("a stream event that is not an object with a type")
        assert isinstance(obj, dict)
        field = _EVENT_FIELDS.get(kind)
        if field is not None and not isinstance(obj.get(field), dict):
            raise anthropic_api.UnreadableAnswer(f"a {kind} event without its {field}")
        if kind.startswith("content_block_"):
            index = obj.get("index")
            if type(index) is not int or not 0 <= index <= self._blocks - (kind != "content_block_start"):
                raise anthropic_api.UnreadableAnswer(f"a {kind} event for a block never started")
            if kind == "content_block_start":
                self._blocks = max(self._blocks, index + 1)

    @property
    def usage(self) -> dict[str, Any] | None:
        # message_start's output count is provisional (1): a stream cut before message_delta is
        # counted from its text instead (it was priced as one output token, whatever it sent).
        if not self._final:
            return None
        return with_tool_calls(openai_usage(self._usage_in), anthropic_tool_calls(self._usage_in, self.tool_calls_seen))

    @property
    def prompt_usage(self) -> dict[str, Any] | None:
        return prompt_side(self._usage_in)

    def _count_server_tool(self, block: Any) -> None:
        """A `server_tool_use` block: one request of Anthropic's web search or fetch (as its final
        `usage.server_tool_use` counts them)."""
        count_server_tool(block, self.tool_calls_seen)

    def _saw_container(self, obj: Any) -> None:
        if (cid := containers.anthropic_container(obj)) is not None:
            self.containers.add(cid)

    def feed(self, chunk: bytes) -> bytes:
        events = self._events.feed(chunk)
        out = []
        for ev in events:
            data = sse.event_data(ev)
            if data == b"[DONE]":
                continue  # no Anthropic event: before `message_stop` it would end a cut stream cleanly
            obj = orjson.loads(data) if data else None
            kind = obj.get("type") if isinstance(obj, dict) else None
            if data is not None:
                self._check(obj)
            if kind == "error" and not self._content:
                assert isinstance(obj, dict)
                err = obj.get("error")
                message, kind = (err.get("message"), err.get("type")) if isinstance(err, dict) else (None, None)
                out.append(_chat_error(str(message or "the upstream failed"), kind))
                continue
            self._content = self._content or has_content(obj)
            if isinstance(obj, dict):
                if kind in ("message_start", "message_delta"):
                    ev = _without_absurd_counts(ev, obj, kind)
                if kind == "content_block_start":
                    self._count_server_tool(obj.get("content_block"))
                    self.files |= containers.output_files(obj.get("content_block"))
                elif kind == "message_start":
                    self._usage_in.update((obj.get("message") or {}).get("usage") or {})
                    self._saw_container(obj.get("message"))
                elif kind == "message_delta":
                    self._saw_container(obj)
                    self._final = self._final or type((obj.get("usage") or {}).get("output_tokens")) is int
                    self._usage_in.update({k: v for k, v in (obj.get("usage") or {}).items() if v is not None})
            out.append(ev + b"\n\n")
            if kind == "message_stop":
                self.ended = True
                out += [_usage_event(self.usage), SENTINEL]
        return b"".join(out)


def _without_absurd_counts(ev: bytes, obj: dict[str, Any], kind: str) -> bytes:
    """`ev` as the client gets it: a count no answer has is 0 (the answer's count is not known
    mid-stream; the ledger counts it from the text), the rest relayed as it came."""
    usage = (obj.get("message") or {}).get("usage") if kind == "message_start" else obj.get("usage")
    absurd = _absurd_counts(usage)
    if not absurd:
        return ev
    assert isinstance(usage, dict)
    shown = {**usage, **dict.fromkeys(absurd, 0)}
    sent = (
        {**obj, "message": {**obj["message"], "usage": shown}} if kind == "message_start" else {**obj, "usage": shown}
    )
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(sent)


class ChatToAnthropic:
    """A chat stream (after the provider's translator) as Anthropic events (`drop`: fields left out)."""

    def __init__(self, inner: StreamTranslator | None) -> None:
        self.inner = inner
        self.enc = anthropic_api.StreamEncoder()
        self._events = sse.EventSplitter(error_limit=sse.HOLD_BYTES)
        self._content = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.enc.usage or (self.inner.usage if self.inner is not None else None)

    def feed(self, chunk: bytes) -> bytes:
        if self.inner is not None:
            chunk = self.inner.feed(chunk)
        events = self._events.feed(chunk)
        out = []
        for ev in events:
            data = sse.event_data(ev)
            if data == b"[DONE]" and not self.enc.finished:
                continue  # without a finish_reason the answer was cut: the relay's error, not `end_turn`
            if data and data != b"[DONE]" and not self._content:
                obj = orjson.loads(data)
                if isinstance(obj, dict) and obj.get("error"):
                    out.append(ev + b"\n\n")  # before any content: a failure to fail over from
                    continue
            was_ended = self.enc.ended
            got = self.enc(ev + b"\n\n")
            self._content = self._content or b"content_block_delta" in got or b"message_delta" in got
            out.append(got)
            if self.enc.ended and not was_ended:
                out += [_usage_event(self.usage), SENTINEL]
        return b"".join(out)


class ClientEncoder:
    """The sentinel and the ledger's usage event removed; a chat error (a cut stream) as Anthropic's."""

    def __call__(self, data: bytes) -> bytes:
        if SENTINEL not in data and b'"error"' not in data and b'data: {"usage"' not in data:
            return data
        events, rest = sse.split_events(data)
        out = []
        for ev in events:
            payload = sse.event_data(ev)
            if payload == b"[DONE]":
                continue
            obj = orjson.loads(payload) if payload else None
            if isinstance(obj, dict) and "type" not in obj:
                if isinstance(obj.get("error"), dict):
                    err = {"type": "api_error", "message": str(obj["error"].get("message"))}
                    out.append(b"event: error\ndata: " + orjson.dumps({"type": "error", "error": err}) + b"\n\n")
                continue  # the ledger's usage event
            out.append(ev + b"\n\n")
        return b"".join(out) + rest


class MessagesCall(Call):
    def usage_body(self) -> bytes | None:
        return orjson.dumps(self.req)  # the client's request (`Attempts.usage_body`)

    def __init__(self, req: dict[str, Any], lost: list[str], headers: dict[str, str], *args: Any) -> None:
        super().__init__(*args)
        self.req = req
        self.lost = lost
        self.client_headers = headers  # anthropic-version / anthropic-beta, forwarded to Anthropic
        self._dropped: dict[str, list[str]] = {}  # by deployment: the fields its request left out

    def find_side_effect(self) -> str | None:
        return side_effects.messages(self.req)

    @property
    def dropped(self) -> list[str] | None:
        """What the answering deployment's request left out (`x-edgeroute-dropped-params`): not
        another's, built for an attempt that failed over or to find whether it reads the request."""
        return self._dropped.get(self.record.deployment or "")

    def upstream_request(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        if isinstance(adapter, AnthropicAdapter):
            return adapter.native_request(dep.model, self.req, self.client_headers)
        unread = _untranslatable(self.req)
        if unread:  # never dropped: the request is about that document
            raise ProxyError(
                400,
                f"The deployment `{dep.name}` cannot read {'; '.join(unread)}; only an Anthropic deployment can.",
                code="unsupported_parameter",
                param="messages",
            )
        lost = [k for k in self.lost if k not in _TRANSLATABLE]  # the others are translated (`anthropic_api`)
        if not lost:
            return super().upstream_request(adapter, dep)
        if adapter.provider.options.get("unsupported_params", "reject") != "drop":
            raise ProxyError(
                400,
                f"The deployment `{dep.name}` cannot honour {', '.join(lost)} (only an Anthropic deployment"
                " can); its provider's unsupported_params rule is reject.",
                code="unsupported_parameter",
                param=lost[0],
            )
        server = sorted(k for k in lost if k in _server_kinds(self.req))
        if server:  # a conversation with a server tool's turns cannot go on without them
            raise ProxyError(
                400,
                f"The deployment `{dep.name}` cannot take back {', '.join(server)} blocks (only an Anthropic "
                "deployment can): a conversation that used Anthropic's server tools goes on at Anthropic.",
                code="unsupported_parameter",
                param="messages",
            )
        self._dropped[dep.name] = lost
        return super().upstream_request(adapter, dep)

    def _json_answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        if not isinstance(adapter, AnthropicAdapter):
            got = super()._json_answer(data, adapter, status)
            if isinstance(got, JsonAnswer):
                got.body = anthropic_api.answer_json(got.body)
            return got
        obj = answer_object(data, status, "content")
        if isinstance(obj, Failure):
            return obj
        usage = Usage.from_openai(openai_usage(obj.get("usage")), answered=True)
        if usage is None:  # none reported, or no output count: the answer is counted from its text
            text = _answer_text(obj.get("content"))
            done = _core.Router.count_tokens(text, self.decision.encoding) if text else 0
            usage = Usage(self.prompt_tokens(), done, estimated=True)
            if absurd := _absurd_counts(obj.get("usage")):  # the client reads the counts it is charged at
                fresh = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
                obj["usage"] = {
                    **obj["usage"],
                    **dict.fromkeys(absurd, 0),
                    **{k: fresh[k] for k in fresh if k in absurd},
                }
                data = orjson.dumps(obj)
        usage.tool_calls = anthropic_tool_calls(obj.get("usage"), anthropic_server_tools(obj.get("content")))
        return JsonAnswer(data, usage, (data, obj))

    async def _hold_stream(self, resp: Response, adapter: Any) -> StreamAnswer | Failure:
        translator: StreamTranslator
        if isinstance(adapter, AnthropicAdapter):
            translator = NativeStream()
        else:
            inner = None if adapter.passthrough else adapter.stream_translator(self.decision.model, True)
            translator = ChatToAnthropic(inner)
        return await super()._hold_stream(resp, Via(translator, adapter))

    def has_content(self, obj: Any) -> bool:
        return has_content(obj)

    def stream_of(self, got: JsonAnswer) -> bytes | None:
        return stream_of_message(got.body)


def _event(kind: str, fields: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def stream_of_message(body: bytes) -> bytes | None:
    """A Messages answer as the events that deliver it (an upstream that ignored `stream`), with
    the relay's end; None for one that is not a message."""
    obj = orjson.loads(body)
    content = obj.get("content")
    if obj.get("type") != "message" or not isinstance(content, list):
        return None
    start = {**obj, "content": [], "stop_reason": None, "stop_sequence": None}
    out = [_event("message_start", {"message": start})]
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            return None
        kind, delta = block.get("type"), None
        if kind == "text" and isinstance(block.get("text"), str):
            opened, delta = {**block, "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif kind == "tool_use":
            opened = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": orjson.dumps(block.get("input", {})).decode()}
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            opened, delta = (
                {"type": "thinking", "thinking": ""},
                {"type": "thinking_delta", "thinking": block["thinking"]},
            )
        else:  # sent whole (a server tool's result, redacted thinking)
            opened = block
        out.append(_event("content_block_start", {"index": i, "content_block": opened}))
        if delta is not None:
            out.append(_event("content_block_delta", {"index": i, "delta": delta}))
        if kind == "thinking" and isinstance(block.get("signature"), str):
            signed = {"type": "signature_delta", "signature": block["signature"]}
            out.append(_event("content_block_delta", {"index": i, "delta": signed}))
        out.append(_event("content_block_stop", {"index": i}))
    end = {"stop_reason": obj.get("stop_reason"), "stop_sequence": obj.get("stop_sequence")}
    out.append(_event("message_delta", {"delta": end, "usage": obj.get("usage") or {}}))
    out.append(_event("message_stop", {}))
    return b"".join(out) + SENTINEL


def _server_kinds(req: dict[str, Any]) -> set[str]:
    """The kinds of server tool blocks in the request's history."""
    kinds: set[str] = set()
    for m in req.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            kinds.update(str(b["type"]) for b in content if anthropic_api.is_server_block(b))
    return kinds


def honoured_by(live: Live, model: str) -> bool:
    """Whether public model `model` reaches a deployment that serves a request with fields only
    Anthropic understands: an Anthropic one, or one whose provider drops them (`MessagesCall`)."""
    cfg = live.config
    for name in reachable_deployments(cfg, model):
        adapter = live.upstreams[cfg.deployments[name].provider].adapter
        if isinstance(adapter, AnthropicAdapter) or adapter.provider.options.get("unsupported_params") == "drop":
            return True
    return False


def _translated_whole(req: dict[str, Any], lost: list[str]) -> bool:
    """Whether every deployment serves the request: all it has beyond the chat translation are
    documents a chat deployment reads, or stop sequences (a budget's downgrade may then go to
    any model)."""
    return set(lost) <= _TRANSLATABLE and not _untranslatable(req)


# Stop sequences: the chat translation sends them (`stop`), but OpenAI's `stop` finish does not
# say which one ended the answer: an Anthropic deployment's `stop_reason: "stop_sequence"` and
# `stop_sequence: "###"` came back `end_turn` and null. Asked of a model that reaches one, the
# request goes natively (a chat deployment still gets the translation).
STOP_SEQUENCES = "stop_sequences"
_TRANSLATABLE = frozenset({"document", STOP_SEQUENCES})


def _says_stop_sequence(req: Any) -> bool:
    return isinstance(req, dict) and isinstance(seqs := req.get(STOP_SEQUENCES), list) and bool(seqs)


def _reaches_anthropic(live: Live, model: Any) -> bool:
    """Whether public model `model` has an Anthropic deployment among those it may reach."""
    cfg = live.config
    if not isinstance(model, str) or model not in cfg.models:
        return False
    return any(
        isinstance(live.upstreams[cfg.deployments[name].provider].adapter, AnthropicAdapter)
        for name in reachable_deployments(cfg, model)
    )


def answer_text(body: bytes) -> str | None:
    """The text of a Messages answer (text, thinking, tool inputs), for the shadow log."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _answer_text(obj.get("content")) if isinstance(obj, dict) else None


async def _check_container(req: dict[str, Any], request: web.Request, live: Live) -> None:
    """A code execution `container` named by id must be one made for the caller's tenant
    (`container_owners`)."""
    container = req.get("container")
    if isinstance(container, dict) and container.get("id") is not None:
        container = container["id"]
        if not isinstance(container, str):
            raise ProxyError(400, "container.id: Input should be a valid string", param="container.id")
    if isinstance(container, str):
        await containers.check(request, live, container, "container")


async def _bind_containers(request: web.Request, live: Live, got: JsonAnswer | StreamAnswer) -> None:
    """A JSON answer's container and the files code execution wrote, bound in one write before
    it is sent (a stream's once it has ended); the answer is parsed for it only with tenants,
    and once. Files are looked for only in an answer naming code execution: one spelling that
    with escapes (the upstream's own) leaves its files unbound, refused later (safe)."""
    if isinstance(got, StreamAnswer):
        return
    if not live.access.keyed(request):
        got.read = None  # its reader's parsed object, held for this alone
        return
    obj = containers.json_answer(got)
    files = containers.answer_files(obj) if b"code_execution" in got.body else ()
    await containers.bind(request, live, containers.answer_containers(obj), files)


async def _bind_stream_containers(request: web.Request, live: Live, got: StreamAnswer) -> None:
    await containers.bind(request, live, containers.stream_containers(got), containers.stream_files(got))


def parse(lost: list[str], headers: dict[str, str], body: bytes) -> Parsed:
    """The request in `body` (checked by `handle`; its shadow mirror's body, the same request
    for another model without `stream`), whose chat translation the core decides on."""
    req = orjson.loads(body)
    chat = anthropic_api.to_openai(req, native=True)
    make = partial(MessagesCall, req, lost, headers)
    stream = bool(req.get("stream"))
    # Its image blocks, as the translation's image parts: reserved for as on the chat path.
    media = with_tools(items_media(chat["messages"]), anthropic_tools(req.get("tools")))
    return Parsed(
        req["model"],
        orjson.dumps(chat),
        stream,
        make,
        ClientEncoder,
        serves=None if _translated_whole(req, lost) else honoured_by,
        answer_text=answer_text,
        check=partial(_check_container, req),
        bind=_bind_containers,
        after_stream=_bind_stream_containers,
        media=media,
    )


def _read(raw: bytes, beta: str | None) -> tuple[Any, list[str]]:
    """The request in `raw` (None if not JSON) and what its chat translation would lose."""
    try:
        req = large_json.loads(raw)
    except orjson.JSONDecodeError:
        return None, []
    return req, lost_fields(req, beta) if isinstance(req, dict) else []


async def handle(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request)
    beta = request.headers.get("anthropic-beta")
    # The scan for what would be lost walks every block: for a body of megabytes (millions of
    # blocks, seconds of Python) it runs with the parse in a worker thread, the loop serving others.
    req, lost = await asyncio.to_thread(_read, raw, beta) if len(raw) > PARSE_ON_LOOP_BYTES else _read(raw, beta)
    if not lost and _says_stop_sequence(req) and _reaches_anthropic(request.app[STATE].live, req.get("model")):
        lost = [STOP_SEQUENCES]
    if not lost:
        return await anthropic_api.messages(request)  # nothing the translation would lose
    forwarded = {k: v for k in ("anthropic-version", "anthropic-beta") if (v := request.headers.get(k))}
    for name, value in forwarded.items():  # forwarded upstream: plain printable ASCII only
        if not (value.isascii() and value.isprintable()) or len(value) > 1000:
            raise ProxyError(400, f"The {name} header is not a valid value.", code="invalid_header")
    return await serve(request, partial(parse, lost, forwarded))
