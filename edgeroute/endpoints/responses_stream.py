"""Responses API streams: a chat stream turned into Responses events, an upstream's own
Responses stream relayed, and what the client finally receives.

The dispatch layer knows chat streams: it holds a stream until its first content, reads
an `{"error": ...}` event before it as a failure to fail over from, and takes `data: [DONE]`
as the clean end. Both translators here speak that to it (a `[DONE]` sentinel after the
terminal event, a failure before any content as a chat error event), and `ClientEncoder`
takes those back out, so the client sees Responses events only: relayed unchanged from an
upstream that speaks Responses, and an `error` event when a stream breaks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from edgeroute import sse
from edgeroute.accounting import RESPONSES_TOOL_ITEMS, responses_tool_calls, with_tool_calls
from edgeroute.endpoints import container_owners as containers
from edgeroute.endpoints import responses_format as rf
from edgeroute.endpoints.responses_events import SENTINEL, OutputSoFar, was_sent
from edgeroute.endpoints.responses_events import event as _event
from edgeroute.providers.base import StreamTranslator
from edgeroute.providers.openai_format import SPLICED

_ITEM_EVENTS = frozenset({"response.output_item.added", "response.output_item.done"})
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_CONTENT = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added",
        "response.reasoning_summary_text.delta",
        *_TERMINAL,
    }
)


def has_content(obj: Any) -> bool:
    """Whether a Responses event carries the answer (the point after which a stream is committed)."""
    return isinstance(obj, dict) and obj.get("type") in _CONTENT


def _chat_error(message: str, code: str | int | None, etype: str | None = None) -> bytes:
    err = {"message": message, "code": code} if etype is None else {"message": message, "type": etype, "code": code}
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


# The error `type` (`in_band_status` reads its HTTP twin) of a Responses stream's error codes,
# which come without one (`response.failed`'s `error.code`, a flat `error` event's `code`).
_CODE_TYPE = {
    "rate_limit_exceeded": "rate_limit_error",
    "server_error": "server_error",
    "vector_store_timeout": "server_error",
    "context_length_exceeded": "invalid_request_error",
    "invalid_request_error": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
}
_CLIENT_CODES = ("invalid_", "image_", "unsupported_", "empty_image", "failed_to_download")


def _failure_event(obj: dict[str, Any], kind: str) -> bytes:
    """A Responses stream's `error` event (flat, or its error under `error`) or `response.failed`
    before content, as the chat error event the dispatch classifies: a client's invalid input is
    the client's 4xx, a rate limit or server error fails over (typeless, all were server errors)."""
    if kind == "response.failed":
        err = obj["response"].get("error") if isinstance(obj.get("response"), dict) else None
    else:
        err = obj["error"] if isinstance(obj.get("error"), dict) else obj
    err = err if isinstance(err, dict) else {}
    code = err.get("code")
    etype = err.get("type") if err.get("type") not in (None, "error") else None
    if etype is None and isinstance(code, str):
        etype = _CODE_TYPE.get(code) or ("invalid_request_error" if code.startswith(_CLIENT_CODES) else None)
    said = str(err.get("message") or "the upstream failed")
    return _chat_error(said, code if isinstance(code, str | int) else None, str(etype) if etype else None)


class UnreadableEvent(ValueError):
    """An upstream's Responses stream event of a shape the OpenAI SDK cannot read."""


class NativeStream:
    """An upstream's Responses stream, relayed event by event (see the module's doc)."""

    def __init__(self, bounded: bool = False) -> None:
        self._events = sse.EventSplitter()
        self._content = False
        # A request with `max_output_tokens` may be ended at its length (`length_end`): its output kept.
        self._so_far = OutputSoFar() if bounded else None
        self.usage: dict[str, Any] | None = None
        # The built-in tool call items begun so far (by output index), for a stream cut before its
        # end: a call begun runs upstream (a search between its item's `added` and `done`), and
        # is billed though the stream broke (as an Anthropic stream's `server_tool_use` blocks are).
        self._tool_items: dict[object, dict[str, Any]] = {}
        self.containers: set[str] = set()  # the code interpreter containers it named, bound to the caller
        # Past its terminal event the stream has ended: what a careless upstream sends after it in
        # the same read (another answer's events) is dropped, never relayed, priced or bound.
        self._ended = False
        self._id: str | None = None  # the response's id, as its first event gave it
        # Ended on a second answer spliced in: not charged to the deployment's health (the relay's
        # `_cut_for_a_splice`, as a chat stream's is).
        self.cut_for_splice = False

    @property
    def tool_calls_seen(self) -> dict[str, int]:
        """The built-in tool calls among the items begun so far: billed though the stream broke."""
        return responses_tool_calls(list(self._tool_items.values()))

    def _check(self, obj: Any) -> None:
        """An event the OpenAI SDK can read: relayed unchanged, an upstream's `data: [1]` or a
        delta that is not a string crashed the client's stream inside the SDK (AttributeError,
        TypeError: no `openai.APIError`). Such an event is the upstream's unreadable stream: the
        relay ends it with an error event (before any content, the attempt fails over)."""
        kind = obj.get("type") if isinstance(obj, dict) else None
        if not isinstance(kind, str):
            raise UnreadableEvent("a stream event that is not an object with a type")
        assert isinstance(obj, dict)
        if kind.endswith(".delta") and "delta" in obj and not isinstance(obj["delta"], str):
            raise UnreadableEvent(f"a {kind} event whose delta is not a string")

    def _tool_item(self, event: dict[str, Any]) -> None:
        """Keeps a built-in tool call item (not a message's text) as it begins, and its container
        once it is done (a code interpreter's calls in one container are billed once)."""
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") not in RESPONSES_TOOL_ITEMS:
            return
        index, item_id = event.get("output_index"), item.get("id")
        key = index if type(index) is int else item_id if isinstance(item_id, str) else len(self._tool_items)
        kept = self._tool_items.setdefault(key, {"type": item["type"], "container_id": None})
        kept["container_id"] = item.get("container_id") or kept["container_id"]

    def feed(self, chunk: bytes) -> bytes:
        so_far = self._so_far
        kept: list[dict[str, Any]] = []  # the events relayed, for `so_far`
        events = self._events.feed(chunk)
        out = []
        for ev in events:
            if self._ended:
                break
            data = sse.event_data(ev)
            if data == b"[DONE]":
                # A Responses stream ends at its terminal event: a `[DONE]` before one is a cut
                # stream (the relay's `stream_incomplete`), not the clean end it is to the relay.
                continue
            obj = orjson.loads(data) if data is not None else None
            if data is not None:
                self._check(obj)
            kind = obj.get("type") if isinstance(obj, dict) else None
            if isinstance(obj, dict) and isinstance(obj.get("response"), dict) and self._spliced(kind, obj["response"]):
                # Two answers spliced in one stream (relayed, the OpenAI SDK raised "Lifecycle
                # response identity changed", recorded ok and billed the second's usage): the
                # upstream's protocol error, failed over before content.
                out.append(_chat_error(SPLICED, "upstream_protocol_error"))
                self._ended = self.cut_for_splice = True
                break
            if not self._content and kind in ("error", "response.failed"):
                assert isinstance(obj, dict)
                out.append(_failure_event(obj, kind))
                continue
            self._content = self._content or has_content(obj)
            if kind in _TERMINAL and isinstance(obj, dict) and _absurd_usage_fixed(obj):
                ev = _event(obj)[:-2]  # rewritten: rare, the usual stream goes by as it came
            out.append(ev + b"\n\n")
            if so_far is not None and isinstance(obj, dict):
                kept.append(obj)
            if kind in _ITEM_EVENTS and isinstance(obj, dict):
                self._tool_item(obj)
                item = obj.get("item")
                if (cid := containers.item_container(item)) is not None:
                    self.containers.add(cid)
            if kind in _TERMINAL and isinstance(obj, dict):
                final = obj.get("response") or {}
                self.usage = with_tool_calls(
                    rf.usage_to_chat(final.get("usage")), responses_tool_calls(final.get("output"))
                )
                out.append(SENTINEL)
                self._ended = True
        relayed = b"".join(out)
        if so_far is not None:
            so_far.fed(relayed, kept)
        return relayed

    def _spliced(self, kind: Any, response: dict[str, Any]) -> bool:
        """Whether an event is a second `response.created`, or one of another response."""
        rid = response.get("id")
        if self._id is None:
            self._id = rid if isinstance(rid, str) else ""
            return False
        return kind == "response.created" or (isinstance(rid, str) and bool(rid and self._id) and rid != self._id)

    def length_end(self, prompt_tokens: int, output_tokens: int, tail: bytes) -> bytes | None:
        """The events that end the stream at its length (the relay's, for an upstream that sent past
        `max_output_tokens`; `tail`: the end of what it relayed): `response.incomplete`, with the
        output so far."""
        if self._so_far is None:
            return None
        return self._so_far.length_end(prompt_tokens, output_tokens, tail)


def _absurd_usage_fixed(obj: dict[str, Any]) -> bool:
    """Whether a terminal event's usage held a count no answer has, now made sound (its total
    repaired, else null: the stream is then counted from its text, as a chat stream's is)."""
    final = obj.get("response")
    if not isinstance(final, dict) or not rf.absurd_usage(final.get("usage")):
        return False
    final["usage"] = rf.repaired_usage(final["usage"])
    return True


class ChatToResponses:
    """A chat stream (OpenAI SSE, after the provider's own translator) as Responses events."""

    def __init__(
        self,
        req: dict[str, Any],
        inner: StreamTranslator | None,
        fallback_usage: Callable[[str], dict[str, Any]],
        bounded: bool = False,
    ) -> None:
        self.req = req
        # A request with `max_output_tokens` may be ended at its length (`length_end`): each read
        # marks where its output began, to be taken back if the relay withheld that read's events.
        self._bounded = bounded
        self._mark: tuple[int, bool, str | None, list[tuple[dict[str, Any], int]]] | None = None
        self._out = b""
        self.inner = inner
        self.fallback_usage = fallback_usage
        self.rid = rf.new_id("resp")
        self._events = sse.EventSplitter()
        self._seq = 0
        self._started = False
        self._done = False
        self._outputs: list[dict[str, Any]] = []  # items in output order, completed at the end
        self._text: dict[str, Any] | None = None  # the open message item
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index → its function_call item
        self._slots = sse.ToolCallSlots()
        self._finish: str | None = None
        self._chat_usage: dict[str, Any] | None = None
        self.counted: dict[str, Any] | None = None  # edgeroute's count in the Response, when none was reported

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._chat_usage or (self.inner.usage if self.inner is not None else None)

    def _emit(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return _event(obj)

    def _response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        obj = rf.response_object(self.req, self.rid, status, output, usage, self._finish)
        return obj

    def feed(self, chunk: bytes) -> bytes:
        if self._bounded:
            self._mark = (self._seq, self._done, self._finish, [(o, len(o["parts"])) for o in self._outputs])
            self._out = self._feed(chunk)
            return self._out
        return self._feed(chunk)

    def _feed(self, chunk: bytes) -> bytes:
        if self.inner is not None:
            chunk = self.inner.feed(chunk)
        events = self._events.feed(chunk)
        out: list[bytes] = []
        for ev in events:
            data = sse.event_data(ev)
            if data is None or self._done:
                continue
            if data == b"[DONE]":
                # Without a finish_reason the answer was cut: not `response.completed`, but the
                # relay's `stream_incomplete` error, as for a stream that ends without `[DONE]`.
                if self._finish is not None:
                    out.append(self._announce_held() + self._end())
                continue
            obj = orjson.loads(data)
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                out.append(b"data: " + data + b"\n\n")  # held: a failure to fail over from; relayed: ClientEncoder's
                continue
            if not self._started:
                self._started = True
                first = self._response("in_progress", [], None)
                out += [
                    self._emit("response.created", response=first),
                    self._emit("response.in_progress", response=first),
                ]
            if isinstance(obj.get("usage"), dict):
                # As a chat stream's (`sse`): total repaired, else none (counted from the text).
                said = obj["usage"]
                self._chat_usage = sse.repaired_usage(said) if sse.absurd_usage(said) else said
            for choice in obj.get("choices") or ():
                out.append(self._choice(choice))
        return b"".join(out)

    def _choice(self, choice: Any) -> bytes:
        if not isinstance(choice, dict) or choice.get("index") not in (0, None):
            return b""
        if self._finish is not None:
            # The answer ended at its finish_reason: what a careless upstream sends after it (text,
            # another answer) is none of it, as a chat stream's relay has it ("abcLATE" was completed).
            return b""
        out = []
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("refusal")
        if isinstance(text, str) and text:
            if self._text is None:
                # An item's text (a call's arguments) as its pieces, joined at the end: `+=` on a
                # string held in a dict copies it whole each delta (a 900 KB answer: seconds).
                self._text = {"id": rf.new_id("msg"), "index": len(self._outputs), "parts": []}
                self._outputs.append(self._text)
                item = {**rf.message_item(self._text["id"], "", "in_progress"), "content": []}
                empty = {"type": "output_text", "text": "", "annotations": []}
                out.append(self._emit("response.output_item.added", output_index=self._text["index"], item=item))
                out.append(self._part("response.content_part.added", empty))
            self._text["parts"].append(text)
            out.append(
                self._emit(
                    "response.output_text.delta",
                    item_id=self._text["id"],
                    output_index=self._text["index"],
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        for tc in delta.get("tool_calls") or ():
            if isinstance(tc, dict):
                out.append(self._tool_delta(tc))
        if choice.get("finish_reason"):
            self._finish = str(choice["finish_reason"])
        return b"".join(out)

    def _tool_delta(self, tc: dict[str, Any]) -> bytes:
        """A tool-call delta. Its item is added once the call has its name, and its id or first
        arguments (an upstream may send them after its first delta: the item had an empty name and
        a made-up call_id); until then its arguments are kept, and sent with the item."""
        fn = tc.get("function") or {}
        slot = self._slots.of(tc)
        call = self._calls.get(slot)
        if call is None:
            call = {"id": rf.new_id("fc"), "index": -1, "call_id": "", "name": "", "parts": [], "function": True}
            self._calls[slot] = call
        call["call_id"] = call["call_id"] or _text(tc.get("id"))
        call["name"] = call["name"] or _text(fn.get("name"))
        args = fn.get("arguments")
        args = args if isinstance(args, str) else ""
        if args:
            call["parts"].append(args)
        if call["index"] >= 0:
            return self._args_delta(call, args)
        if call["name"] and (call["call_id"] or call["parts"]):
            return self._announce(call)
        return b""

    def _announce(self, call: dict[str, Any]) -> bytes:
        """The call's item added, with the arguments it has so far."""
        call["index"] = len(self._outputs)
        call["call_id"] = call["call_id"] or rf.new_id("call")
        self._outputs.append(call)
        item = rf.call_item(call["id"], call["call_id"], call["name"], "", "in_progress")
        added = self._emit("response.output_item.added", output_index=call["index"], item=item)
        return added + self._args_delta(call, "".join(call["parts"]))

    def _args_delta(self, call: dict[str, Any], args: str) -> bytes:
        if not args:
            return b""
        return self._emit(
            "response.function_call_arguments.delta", item_id=call["id"], output_index=call["index"], delta=args
        )

    def _announce_held(self) -> bytes:
        """The calls still held at the answer's end (never named), each added as it is."""
        return b"".join(self._announce(c) for c in self._calls.values() if c["index"] < 0)

    def _part(self, kind: str, part: dict[str, Any]) -> bytes:
        assert self._text is not None
        return self._emit(kind, item_id=self._text["id"], output_index=self._text["index"], content_index=0, part=part)

    def length_end(self, prompt_tokens: int, output_tokens: int, tail: bytes) -> bytes | None:
        """The events that end the stream at its length (the relay's, for an upstream that sent past
        `max_output_tokens`; `tail`: the end of what it relayed): its items closed, as far as they
        were relayed, `response.incomplete` with the usage counted."""
        if self._mark is not None and not was_sent(self._out, tail):  # the last read's output taken back
            self._seq, self._done, self._finish, kept = self._mark
            self._outputs = [o for o, _ in kept]
            for o, n in kept:
                del o["parts"][n:]
        if not self._started or self._done:
            return None
        self._finish = "length"
        return self._end({"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens}, "incomplete")

    def _end(self, cut: dict[str, Any] | None = None, status: str = "completed") -> bytes:
        """The items' closing events (each item `status`), the terminal event, then the sentinel;
        with the usage `cut` reports (the stream's own kept for its pricing), else the stream's."""
        self._done = True
        out = []
        items = []
        for o in self._outputs:
            whole = "".join(o["parts"])
            if o.get("function"):
                if not whole:
                    # A call without arguments (a chat upstream's ""): `{}`, as the answer
                    # not streamed has it; "" failed the client's json.loads.
                    whole = "{}"
                    out.append(
                        self._emit(
                            "response.function_call_arguments.delta",
                            item_id=o["id"],
                            output_index=o["index"],
                            delta="{}",
                        )
                    )
                item = rf.call_item(o["id"], o["call_id"], o["name"], whole, status)
                out.append(
                    self._emit(
                        "response.function_call_arguments.done",
                        item_id=o["id"],
                        output_index=o["index"],
                        arguments=whole,
                    )
                )
            else:
                item = rf.message_item(o["id"], whole, status)
                out.append(
                    self._emit(
                        "response.output_text.done",
                        item_id=o["id"],
                        output_index=o["index"],
                        content_index=0,
                        text=whole,
                        logprobs=[],
                    )
                )
                out.append(self._part("response.content_part.done", item["content"][0]))
            out.append(self._emit("response.output_item.done", output_index=o["index"], item=item))
            items.append(item)
        chat_usage = cut or self.usage
        if chat_usage is None:
            # Edgeroute's count, for the client: kept apart from `usage` (what the upstream
            # reported), so that the relay counts the stream as estimated (it was recorded as
            # reported, `tokens_estimated: false`).
            text = "".join(piece for o in self._outputs for piece in o["parts"])
            chat_usage = self.counted = self.fallback_usage(text)
        final = self._response("completed", items, rf.usage_from_chat(chat_usage))
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        out.append(self._emit(kind, response=final))
        out.append(SENTINEL)
        return b"".join(out)


def _text(value: Any) -> str:
    """A tool call's id or name as given: a careless upstream's null (or number) is none or its text."""
    return value if isinstance(value, str) else "" if value is None else str(value)


_SEQ = re.compile(rb'"sequence_number":\s*(\d+)')


class ClientEncoder:
    """What the client receives: the sentinel removed, a chat error event (a stream cut by the
    upstream or the proxy) turned into a Responses `error` event.

    An upstream's `response.failed` reaches it only after content (before, the attempt failed
    over): relayed as the upstream's words, it is a broken stream all the same (`cut`, for the
    relay's record and the deployment's health), where it was recorded ok."""

    def __init__(self) -> None:
        self._seq = 0
        self.cut: str | None = None

    def __call__(self, data: bytes) -> bytes:
        if (found := _SEQ.findall(data)) and (last := int(found[-1])) >= self._seq:
            self._seq = last + 1
        if self.cut is None and data.find(b'"response.failed"') >= 0 and _failed(data):
            self.cut = "upstream_error"
        if SENTINEL in data:
            data = data.replace(SENTINEL, b"")
        if b'"error"' not in data:
            return data
        events, rest = sse.split_events(data)
        out = []
        for ev in events:
            payload = sse.event_data(ev)
            obj = orjson.loads(payload) if payload is not None else None
            err = obj.get("error") if isinstance(obj, dict) and "type" not in obj else None
            if isinstance(err, dict):
                msg = {
                    "type": "error",
                    "code": err.get("code"),
                    "message": str(err.get("message")),
                    "param": None,
                    "sequence_number": self._seq,
                }
                self._seq += 1
                out.append(_event(msg))
            else:
                out.append(ev + b"\n\n")
        return b"".join(out) + rest


def _failed(data: bytes) -> bool:
    """Whether `data` (whole events) holds a `response.failed` event."""
    for ev in sse.split_events(data)[0]:
        payload = sse.event_data(ev)
        obj = orjson.loads(payload) if payload and payload != b"[DONE]" else None
        if isinstance(obj, dict) and obj.get("type") == "response.failed":
            return True
    return False
