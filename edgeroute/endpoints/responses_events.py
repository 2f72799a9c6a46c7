"""Responses events made here rather than relayed: a whole Response as the stream that delivers
it (an upstream that answered a stream request with JSON), and the end of an upstream's own
stream stopped at its length (`response.incomplete`, its output so far, as OpenAI ends one).

Each item is closed as OpenAI's streams close it (its text's or arguments' `done`, its content
parts', then `response.output_item.done`): a client that builds the answer from the item events
(the SDK's `responses.stream`) reads the same answer as the terminal event's response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from edgeroute.endpoints import responses_format as rf

SENTINEL = b"data: [DONE]\n\n"  # the relay's end of a stream (`responses_stream`), taken out for the client
_TEXTS = {"output_text": "text", "refusal": "refusal"}  # a message part's kind → its text's field
# A delta event → where its text goes: the item's list of parts (None: the item itself), the field,
# and the event's field that says which part.
_DELTAS = {
    "response.output_text.delta": ("content", "text", "content_index"),
    "response.refusal.delta": ("content", "refusal", "content_index"),
    "response.function_call_arguments.delta": (None, "arguments", "output_index"),
    "response.reasoning_summary_text.delta": ("summary", "text", "summary_index"),
}
_PARTS = {"response.content_part.added": "content", "response.reasoning_summary_part.added": "summary"}
_TERMINAL = {"incomplete": "response.incomplete", "failed": "response.failed"}

Emit = Callable[..., bytes]


def event(obj: dict[str, Any]) -> bytes:
    """A Responses event as it goes on the wire (named by its type)."""
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _emitter(seq: int) -> Emit:
    """Makes events numbered from `seq` on."""
    count = [seq]

    def emit(kind: str, **fields: Any) -> bytes:
        count[0] += 1
        return event({"type": kind, "sequence_number": count[0] - 1, **fields})

    return emit


def _closed(emit: Emit, index: int, item: dict[str, Any]) -> list[bytes]:
    """The events that end an item (its text's and its parts' `done`, then its own)."""
    out = []
    at: dict[str, Any] = {"item_id": item.get("id"), "output_index": index}
    if item.get("type") == "message" and isinstance(item.get("content"), list):
        for i, part in enumerate(item["content"]):
            field = _TEXTS.get(str(part.get("type"))) if isinstance(part, dict) else None
            if field is not None:
                extra = {"logprobs": part.get("logprobs") or []} if field == "text" else {}
                text = part.get(field) or ""
                out.append(emit(f"response.{part['type']}.done", **at, content_index=i, **{field: text}, **extra))
            out.append(emit("response.content_part.done", **at, content_index=i, part=part))
    elif item.get("type") == "function_call":
        out.append(emit("response.function_call_arguments.done", **at, arguments=item.get("arguments") or ""))
    out.append(emit("response.output_item.done", output_index=index, item=item))
    return out


def stream_of_response(body: bytes) -> bytes | None:
    """A Response as the events that deliver it, with the relay's end; None for one that is not a
    Response. Message text and function call arguments come as one delta each; other items whole."""
    obj = orjson.loads(body)
    output = obj.get("output") if isinstance(obj, dict) and obj.get("object") == "response" else None
    if not isinstance(output, list) or not all(isinstance(item, dict) for item in output):
        return None
    emit = _emitter(0)
    start = {**obj, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    out = [emit("response.created", response=start), emit("response.in_progress", response=start)]
    for index, item in enumerate(output):
        at: dict[str, Any] = {"item_id": item.get("id"), "output_index": index}
        kind = item.get("type")
        if kind == "message" and isinstance(item.get("content"), list):
            out.append(
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "content": []},
                )
            )
            for i, part in enumerate(item["content"]):
                field = _TEXTS.get(str(part.get("type"))) if isinstance(part, dict) else None
                text = part.get(field) if field is not None else None
                if not isinstance(text, str):  # a part of another kind: added whole
                    out.append(emit("response.content_part.added", **at, content_index=i, part=part))
                    continue
                out.append(emit("response.content_part.added", **at, content_index=i, part={**part, field: ""}))
                extra = {"logprobs": part.get("logprobs") or []} if field == "text" else {}
                out.append(emit(f"response.{part['type']}.delta", **at, content_index=i, delta=text, **extra))
        elif kind == "function_call" and isinstance(item.get("arguments"), str):
            out.append(
                emit(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
            )
            out.append(emit("response.function_call_arguments.delta", **at, delta=item["arguments"]))
        else:  # reasoning, a built-in tool's call: added whole
            out.append(emit("response.output_item.added", output_index=index, item=item))
        out += _closed(emit, index, item)
    out.append(emit(_TERMINAL.get(obj.get("status"), "response.completed"), response=obj))
    return b"".join(out) + SENTINEL


def was_sent(out: bytes, tail: bytes) -> bool:
    """Whether a translator's last output `out` was relayed: the relayed stream (its `tail`) ends
    with it. The relay withholds the read that would take a stream past its limit (one event of
    40,000 tokens for `max_output_tokens: 5`): a stream's end at its length gives none of it."""
    n = min(len(out), len(tail))
    return out[len(out) - n :] == tail[len(tail) - n :]


class OutputSoFar:
    """An upstream's Responses stream as relayed so far: its response, its items and the text
    their deltas added (kept as pieces: joined once, at the end), for `length_end`. A delta (most
    events) costs a lookup and an append; what it says is checked only at the end. A read's
    events are taken once the next read comes (the relay asks for none after one it withheld),
    or at the end if it was relayed (`was_sent`)."""

    __slots__ = ("_done", "_items", "_last", "_out", "_pending", "_pieces", "_response")

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._items: dict[int, dict[str, Any]] = {}  # by output index
        self._done: set[int] = set()  # the items whose `done` event was relayed (whole)
        # The deltas by where they go: (output index, `_DELTAS`' entry, part index).
        self._pieces: dict[tuple[Any, tuple[str | None, str, str], Any], list[Any]] = {}
        self._last: dict[str, Any] = {}  # the last event (its sequence number)
        self._pending: list[dict[str, Any]] = []  # the last read's events
        self._out = b""  # the last read's output

    def fed(self, out: bytes, events: list[dict[str, Any]]) -> None:
        """A read's output, as the relay was given it, and its events: the last read's were relayed."""
        self._take()
        self._out, self._pending = out, events

    def _take(self) -> None:
        """Takes the last read's events (a delta's inline: most events are)."""
        pieces_of = self._pieces
        for obj in self._pending:
            if (where := _DELTAS.get(obj.get("type"))) is not None:  # type: ignore[arg-type]
                at = (obj.get("output_index"), where, obj.get(where[2]))
                if (pieces := pieces_of.get(at)) is None:
                    pieces = pieces_of[at] = []
                pieces.append(obj.get("delta"))
            else:
                self._take_other(obj)
        if self._pending:
            self._last = self._pending[-1]
        self._pending = []

    def _take_other(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        index = obj.get("output_index")
        if kind in ("response.created", "response.in_progress"):
            if isinstance(obj.get("response"), dict):
                self._response = obj["response"]
        elif type(index) is not int:
            return
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            if isinstance(item := obj.get("item"), dict):
                self._items[index] = item
                if kind == "response.output_item.done":
                    self._done.add(index)
                    for at in [at for at in self._pieces if at[0] == index]:  # the item, whole
                        del self._pieces[at]
        elif (key := _PARTS.get(kind)) is not None:  # type: ignore[arg-type]
            parts = self._items.get(index, {}).get(key)
            if isinstance(parts, list) and isinstance(obj.get("part"), dict):
                parts.append(obj["part"])

    def length_end(self, prompt_tokens: int, output_tokens: int, tail: bytes) -> bytes | None:
        """The events that end the stream at its length (`tail`: the end of what was relayed):
        each open item closed (`incomplete`), then `response.incomplete` with the output so far
        and the usage counted; None before the upstream's `response.created`."""
        if was_sent(self._out, tail):
            self._take()
        if self._response is None:
            return None
        for (index, (key, field, _), at), pieces in self._pieces.items():
            item = self._items.get(index) if type(index) is int else None
            target = item if item is None or key is None else _part(item, key, at)
            if target is not None and index not in self._done:
                text = "".join(p for p in pieces if isinstance(p, str))
                target[field] = str(target.get(field) or "") + text
        seq = self._last.get("sequence_number")
        emit = _emitter(seq + 1 if type(seq) is int else 0)
        out: list[bytes] = []
        for index in sorted(self._items):
            if index not in self._done:
                self._items[index]["status"] = "incomplete"
                out += _closed(emit, index, self._items[index])
        usage = rf.usage_from_chat({"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens})
        final = {
            **self._response,
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "output": [self._items[i] for i in sorted(self._items)],
            "usage": usage,
        }
        out.append(emit("response.incomplete", response=final))
        return b"".join(out) + SENTINEL


def _part(item: dict[str, Any], key: str, at: Any) -> dict[str, Any] | None:
    parts = item.get(key)
    part = parts[at] if isinstance(parts, list) and type(at) is int and 0 <= at < len(parts) else None
    return part if isinstance(part, dict) else None
