"""Small helpers for OpenAI-style server-sent events."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import orjson

from edgeroute import redact

DONE = b"data: [DONE]"

# The checks every relayed chunk pays search with `bytes.find`, not `in`: on Python 3.11,
# `needle in data` first tries the needle as an integer (a byte's value) and builds, then
# drops, a TypeError with its formatted message: ~2,000 instructions a test, four times
# what the search costs, several times a chunk.
# `[DONE]` as the stream's last event: a `data:` line (its space optional, as SSE has it) that a
# line end precedes, with its line end and blank line. A model's text that quotes it (an SSE
# tutorial) sits inside a JSON string, where no raw line end can: found by substring, it ended
# the relay and cut the answer short.
_DONE_EVENT = re.compile(rb"[\r\n]data: ?\[DONE\][ \t]*(?:\r\n|\r|\n|\Z)(?:\r\n|\r|\n)?")


def through_done(data: bytes) -> tuple[bytes, bool]:
    """`data` (whole events, as a stream's translator hands them on) up to and including the
    `[DONE]` event, and whether it holds one. What an upstream sends after its stream's end
    (an event after Responses' `response.completed` or Anthropic's `message_stop`, junk after
    `[DONE]`) is no part of the answer: relayed, an SDK's client read text after the end."""
    if data.find(b"[DONE]") < 0:
        return data, False
    m = _DONE_EVENT.search(b"\n" + data)
    return (data, False) if m is None else (data[: m.end() - 1], True)


# One upstream event still unfinished past this is the upstream's protocol error: no provider
# sends one (the largest real events, a Responses stream's images in base64, stay well under it).
MAX_EVENT_BYTES = 32 << 20
HOLD_BYTES = 1 << 20  # an error event held whole past this, and an answer's head, are cut here


class StreamProtocolError(ValueError):
    """An upstream's stream that breaks its protocol: before content the attempt fails over,
    after it the relay ends the client's stream with an error event (`upstream_protocol_error`).
    Its message follows "The upstream ..." ("sent a stream event that is not JSON")."""


class EventTooLarge(StreamProtocolError):
    """An upstream stream event still unfinished past a bound: the upstream broke the protocol
    (it opened an event and never ended it). The event's bytes are dropped, never relayed."""

    def __init__(self, limit: int, what: str = "event") -> None:
        self.limit = limit
        super().__init__(f"sent a stream {what} still unfinished past {limit >> 20} MiB")


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Splits complete events (separated by a blank line) off `buf`; returns (events, rest).
    A line may end in CRLF, LF or a lone CR, as the SSE specification has it."""
    return _split(_lf(buf))


def _lf(buf: bytes) -> bytes:
    """`buf` with its line ends (CRLF, CR) as LF: a raw CR is a line end in SSE, never text
    (JSON writes it `\\r`). A server ending lines with CR alone was read as one unending line."""
    if buf.find(b"\r") < 0:
        return buf
    return buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _split(buf: bytes) -> tuple[list[bytes], bytes]:
    """`split_events` of bytes whose CRLFs are LFs already."""
    *events, rest = buf.split(b"\n\n")
    return [e for e in events if e.strip()], rest


class EventSplitter:
    """:func:`split_events` over a stream read in pieces, bounded and in linear time.

    The unfinished event is kept between reads; a read that ends no event is only searched
    for a blank line (with the byte before it), so an event read in many small pieces is
    joined once, when it ends. One still unfinished past `limit` bytes raises
    :class:`EventTooLarge` (an upstream that opens an event and never ends it was held in
    memory until the request's timeout); one that shows an `"error"` key, past `error_limit`
    (error events are small; the guard of a relayed stream holds them whole up to the same bound).
    """

    __slots__ = ("_cr", "_error", "_held", "_size", "error_limit", "limit")

    def __init__(self, limit: int | None = None, error_limit: int | None = None) -> None:
        self.limit = MAX_EVENT_BYTES if limit is None else limit
        self.error_limit = error_limit
        self._held: list[bytes] = []
        self._size = 0
        self._cr = False  # the last read ended in CR: the next one's first LF would end the same line
        self._error = False

    @property
    def holding(self) -> bool:
        """Whether an unfinished event (or a CR that may begin a CRLF) is kept from earlier reads."""
        return bool(self._held) or self._cr

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events `chunk` completes (each without its blank line)."""
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF whose CR ended the last read (read as a line end)
            self._cr = False
        if not chunk:
            return []
        # A CR that ends a read is a line end either way (alone, or a CRLF's): taken as one now,
        # an event that ends the stream with it is not kept waiting for a byte that never comes.
        self._cr = chunk.endswith(b"\r")
        chunk = _lf(chunk)
        held = self._held
        if held and (held[-1][-1:] + chunk[:1]).find(b"\n\n") < 0 and chunk.find(b"\n\n") < 0:
            held.append(chunk)
            self._size += len(chunk)
            self._check(chunk)
            return []
        events, rest = _split(b"".join(held) + chunk if held else chunk)
        self._held, self._size, self._error = ([rest] if rest else []), len(rest), False
        self._check(rest)
        return events

    def _check(self, new: bytes) -> None:
        if self.error_limit is not None and not self._error:
            # the marker may straddle two reads: search the new bytes with a few before them
            before = self._held[-2][-6:] if len(self._held) > 1 else b""
            self._error = (before + new).find(b'"error"') >= 0
        if self._error and self.error_limit is not None and self._size > self.error_limit:
            raise EventTooLarge(self.error_limit, "error event")
        if self._size > self.limit:
            raise EventTooLarge(self.limit)


class ChatChunks:
    """The check of an OpenAI-format stream relayed as it is (chat, completions): each event is
    `[DONE]` or a JSON object whose `choices`, when given, is a list of objects, each `delta` an
    object. Relayed as they came, `data: [1]`, a choice that is a string, a null `delta`, bytes
    that are not UTF-8 or text that is not JSON crashed the client's stream inside the OpenAI
    SDK or the code that reads it (no `APIError` its code handles), and the request was
    recorded as served. Such an event raises :class:`StreamProtocolError` before it is relayed
    (so do events that end in the same read). Only whole events go on, as a translator's do:
    an event is bounded as every other stream's is (an error event by :data:`HOLD_BYTES`, any
    other by :data:`MAX_EVENT_BYTES`), where one never ended was sent on in pieces, as one
    line no client could read, up to the answer's bound.

    While `parsed` is a list, each event's object (None for `[DONE]`) is appended to it as the
    event is checked: what holds a stream until its first content reads them there rather than
    parsing every event a second time.

    A chunk of another completion (`AnswerId`: a load balancer that spliced two streams) ends
    the stream: the events before it go on, then :data:`SPLICED_EVENT`, and nothing more is read
    (before content the attempt fails over on it, as on a translated stream's second message).
    Tool calls past :data:`MAX_TOOL_CALLS` in one choice raise :class:`StreamProtocolError`; so
    does a chat chunk (a choice with a `delta`) in a legacy completions stream (`texts`), whose
    client read its `text` as None on a 200."""

    __slots__ = ("_choices", "_events", "_ids", "_slots", "_texts", "ended", "parsed")

    def __init__(self, choices: int | None = None, texts: bool = False) -> None:
        self._events = EventSplitter(error_limit=HOLD_BYTES)
        self._slots: dict[int, ToolCallSlots] = {}  # per choice, for tool calls sent without `index`
        self.parsed: list[dict[str, Any] | None] | None = None
        self._choices = Choices(choices)
        self._ids = AnswerId()
        self._texts = texts  # a `/v1/completions` stream: choices of `text`, never a chat `delta`
        self.ended = False  # a spliced chunk ended it: nothing more is relayed

    @property
    def usage(self) -> dict[str, Any] | None:
        return None  # read from the stream's own events (`find_usage`)

    def answered(self) -> bool:
        """Whether every choice the request asked for has given its `finish_reason`: the answer
        is whole, `[DONE]` or not (some OpenAI-compatible servers end the stream without it)."""
        gate = self._choices
        return gate.count is not None and len(gate.finished) >= gate.count

    def feed(self, chunk: bytes) -> bytes:
        if self.ended:
            return b""
        if (
            chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2
            and not self._events.holding
        ):
            # the common read: one event of one line
            unnumbered = _check_chunk(chunk[6:-2], self.parsed, self._choices, self._ids, self._texts)
            return chunk if unnumbered is None else self._numbered(unnumbered)
        if chunk.endswith(b"\n\n") and chunk.find(b"\r") < 0 and not self._events.holding:
            # A burst of whole events (several reads relayed together): when each is one `data:`
            # line, checked where it lies and sent on as it came, not split, joined and copied.
            lines = chunk.split(b"\n\n")
            if not lines.pop() and (checked := self._burst(chunk, lines)) is not None:
                return checked
        events = self._events.feed(chunk)
        out = []
        for ev in events:
            data = event_data(ev)
            unnumbered = (
                _check_chunk(data, self.parsed, self._choices, self._ids, self._texts) if data is not None else None
            )
            out.append(ev + b"\n\n" if unnumbered is None else self._numbered(unnumbered))
            if self.ended:
                break
        return b"".join(out)

    def _burst(self, chunk: bytes, lines: list[bytes]) -> bytes | None:
        """`chunk`'s events (`lines`, each without its blank line) checked, as they are to be
        sent; None, checking none, unless each is one `data:` line."""
        for ev in lines:
            if not ev.startswith(b"data:") or ev.find(b"\n") >= 0:
                return None
        out: list[bytes] | None = None
        ids, texts = self._ids, self._texts
        for i, ev in enumerate(lines):
            data = ev[5:].lstrip(b" ")  # as `event_data` reads it
            unnumbered = _check_chunk(data, self.parsed, self._choices, ids, texts)
            if unnumbered is not None:
                if out is None:
                    out = [e + b"\n\n" for e in lines[:i]]
                out.append(self._numbered(unnumbered))
                if self.ended:
                    break
            elif out is not None:
                out.append(ev + b"\n\n")
        return chunk if out is None else b"".join(out)

    def _numbered(self, obj: dict[str, Any]) -> bytes:
        """The event `obj` with an `index` in each of its tool-call deltas (see :class:`ToolCallSlots`):
        without one, the OpenAI SDK's stream helpers (`chat.completions.stream`) raised a TypeError.
        Nothing for an event whose every choice was dropped (`Choices`); the splice's error event
        for a chunk of another completion (`AnswerId`), which ends the stream."""
        if obj is DROPPED:
            return b""
        if obj is SPLICED:
            self.ended = True
            return SPLICED_EVENT
        for c in obj["choices"]:
            calls = (c.get("delta") or _EMPTY).get("tool_calls")
            for tc in calls if type(calls) is list else ():
                if type(tc) is dict and tc.get("index") is None:
                    choice = c.get("index") if type(c.get("index")) is int else 0
                    tc["index"] = index = self._slots.setdefault(choice, ToolCallSlots()).of(tc)
                    if index >= MAX_TOOL_CALLS:
                        raise TooManyToolCalls()
        return b"data: " + orjson.dumps(obj) + b"\n\n"


DROPPED: dict[str, Any] = {}  # `_check_chunk`'s event that is not sent at all
# The error event that ends a chat stream into which an upstream spliced a chunk of another
# completion (`AnswerId`), in the words of a translated stream's second message
# (`openai_format.spliced`); `SPLICED`, the object a held stream reads for it.
SPLICED_MESSAGE = "The upstream sent a second answer in one stream; the answer is incomplete."
_SPLICED_ERROR = {
    "message": SPLICED_MESSAGE,
    "type": "upstream_error",
    "param": None,
    "code": "upstream_protocol_error",
}
SPLICED: dict[str, Any] = {"error": _SPLICED_ERROR}
SPLICED_EVENT = b"data: " + orjson.dumps(SPLICED) + b"\n\n"

# The most tool calls one choice of an answer may make. No model makes a thousand in one turn;
# an upstream that sends 150,000 (every one held to the finish for an Anthropic client, then
# checked and written at once: two seconds of the event loop) is broken, its stream a protocol error.
MAX_TOOL_CALLS = 1024


class TooManyToolCalls(StreamProtocolError):
    def __init__(self) -> None:
        super().__init__(f"sent more than {MAX_TOOL_CALLS} tool calls in one answer")


class AnswerId:
    """Whether a chat chunk begins another completion than the stream's (a careless upstream,
    or a load balancer that spliced two streams: relayed as one, the client read two answers
    run together). Judged only on chunks with choices (a usage chunk, an Azure prompt-filter
    chunk says nothing), a choice past its `finish_reason` too: `Choices` dropped a second
    answer's content there, but its empty role chunk went on under its own id, then its usage
    chunk, which the client read, and was charged, as the answer's. Three signs:

    - Its `id` differs from the one that choice's chunks repeated (OpenAI gives every chunk of
      an answer one id; SGLang's `n>1` choices each have their own). An empty or missing id
      (TGI, Azure) says nothing; a server that gives every chunk an id of its own (LiteLLM,
      llama.cpp and Foundry Local have) shows it at its second chunk, and its ids are not read.
    - Its `model` differs from the one the stream's chunks repeated: every server names one
      model in every chunk of an answer (an empty one, Azure's first chunk, says nothing), so a
      second answer of another model shows, whatever its id and role (TGI's empty ids, a load
      balancer that keeps the first id). Read as ids are: a first chunk of its own (a gateway's
      role chunk under an alias) arms nothing until a model repeats.
    - A `role` delta, without a finish, for a choice that has had content in a chunk without a
      role: an answer begins with its role. Servers that send the role on every chunk (Ollama,
      TGI) never had such a chunk.

    Unseen (nothing tells them from an answer): a second answer of the same model that starts
    without a role delta under an empty, the same or a per-chunk id, and one spliced right after
    a choice's first chunk (ids and models are not yet armed there, and a role on a second chunk
    is what Ollama and TGI send on every one). O(1) a choice."""

    __slots__ = ("ids", "models", "said")

    def __init__(self) -> None:
        self.ids = Repeated()  # per choice
        self.models = Repeated()  # one for the stream (key 0)
        self.said: set[int] = set()  # choices that had content in a chunk without a role

    def other(self, cid: Any, choices: list[Any], model: Any = None) -> bool:
        """Whether a chunk whose `id` is `cid`, whose `model` is `model` and whose choices are
        `choices` is another completion's."""
        models = self.models
        if model and not models.off and models.seen.get(0) != model and models.switched(0, model):
            return True
        ids = self.ids
        for c in choices:
            if type(c) is not dict:
                return False  # not a chat chunk: `_check_chunk` says so
            index = c.get("index") or 0
            if type(index) is not int:
                continue
            if cid and not ids.off and ids.seen.get(index) != cid and ids.switched(index, cid):
                return True
            delta = c.get("delta")
            if type(delta) is not dict:
                continue
            if delta.get("role"):
                if index in self.said and not c.get("finish_reason"):
                    return True
            elif index not in self.said and (
                delta.get("content") or delta.get("tool_calls") or delta.get("refusal") or delta.get("function_call")
            ):
                self.said.add(index)
        return False


class Repeated:
    """A value each chunk of an answer repeats (its `id` per choice, its `model`), per key: armed
    once a key's first value comes again; a second chunk of another value means a server that
    gives every chunk its own (`off`: never read again)."""

    __slots__ = ("first", "off", "seen")

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}  # per key: the value its chunks repeated
        self.first: dict[int, str] = {}  # per key: its first value, until a later chunk has it
        self.off = False

    def switched(self, key: int, value: Any) -> bool:
        """Whether `key`'s value changed to `value` (not its repeated one) after it repeated
        (the rare path: a key's first chunk, its first value again, or another value)."""
        if type(value) is not str:
            return False
        if key in self.seen:
            return True
        first = self.first.get(key)
        if first is None:
            self.first[key] = value
        elif first == value:
            self.seen[key] = value
        else:
            self.off = True  # a second chunk of another value: a value a chunk
        return False


_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
MAX_COUNT = 1 << 40  # tokens past which a count is garbage (as `Usage.from_openai` reads one)


def absurd_usage(usage: Any) -> bool:
    """Whether an upstream's `usage` holds a count no answer has (negative, 1e30, past
    `MAX_COUNT`): relayed as it came, a client showed -1,000,000 tokens, and the cache
    replayed them to every later caller. The ledger never took them (it counts instead)."""
    if not isinstance(usage, dict):
        return False
    for k in _COUNTS:
        v = usage.get(k)
        if (type(v) is int or type(v) is float) and not 0 <= v < MAX_COUNT:  # (NaN is not either)
            return True
    return False


def repaired_usage(usage: Any) -> dict[str, Any] | None:
    """An absurd `usage` whose prompt and completion counts are sound, with the total they
    make (a total of -1 beside 10 prompt and 5,000 completion tokens, 4,990 of them reasoning);
    None when those counts are garbage too (the answer is then counted from its text). Nulled
    whole, such a stream's reasoning tokens, which its text does not show, went unbilled."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is int and type(completion) is int and 0 <= prompt < MAX_COUNT and 0 <= completion < MAX_COUNT:
        return {**usage, "total_tokens": prompt + completion}
    return None


class Choices:
    """Which choices of a chat stream are still open: one past its `finish_reason`, or whose
    index is not below the request's `n` (`count`, when known), says nothing more. Relayed, a
    second answer after the first one's `stop` reached the client as two finishes and was
    cached as one text ("firstsecond"), and a choice `n` did not ask for became part of an
    Anthropic client's answer."""

    __slots__ = ("count", "finished")

    def __init__(self, count: int | None) -> None:
        self.count = count
        self.finished: set[int] = set()

    def keep(self, obj: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any] | None:
        """None if every one of `choices` (the event's) is open, else the event without the
        others (`DROPPED` if nothing of it is left); records the choices that finish. (Run for
        every event: nothing is built unless something is dropped.)"""
        finished, count = self.finished, self.count
        dropped: list[dict[str, Any]] | None = None
        for c in choices:
            index = c.get("index", 0)
            if index is None:
                index = 0  # as the clients read a careless one
            if (
                type(index) is not int
                or index < 0
                or (count is not None and index >= count)
                or (index in finished and _says_something(c))
            ):
                # Not asked for, no choice at all (-1, "1"), or more of a finished answer: dropped
                # (a finished choice's annotations, such as Azure's content filter results, go on).
                dropped = [c] if dropped is None else [*dropped, c]
            elif c.get("finish_reason"):
                finished.add(index)
        if dropped is None:
            return None
        kept = [c for c in choices if all(c is not d for d in dropped)]
        obj["choices"] = kept  # (the object a held stream reads too)
        return DROPPED if not kept and obj.get("usage") is None else obj


def _says_something(choice: dict[str, Any]) -> bool:
    """Whether a choice's chunk carries an answer's content or a finish (not annotations alone)."""
    delta = choice.get("delta")
    if choice.get("finish_reason"):
        return True
    return type(delta) is dict and any(
        delta.get(k) for k in ("content", "tool_calls", "refusal", "function_call", "reasoning_content", "reasoning")
    )


def _check_chunk(
    data: bytes,
    parsed: list[dict[str, Any] | None] | None,
    open_choices: Choices | None = None,
    ids: AnswerId | None = None,
    texts: bool = False,
) -> dict[str, Any] | None:
    """Raises :class:`StreamProtocolError` for an event no client can read (a chat chunk, when
    `texts`, in a legacy completions stream); returns an event to send in another form: whose
    tool-call deltas need their `index`, or without the choices `open_choices` closed (`DROPPED`:
    none at all), or `SPLICED` for a chunk of another completion (`ids`); else None (the event
    goes on as it came).
    The event's object (None for `[DONE]`, `SPLICED`) is appended to `parsed` when given."""
    if data == b"[DONE]":
        if parsed is not None:
            parsed.append(None)
        return None
    repaired = False
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        if (obj := _surrogates_replaced(data)) is None:
            raise StreamProtocolError("sent a stream event that is not JSON in UTF-8") from None
        repaired = True
    if type(obj) is not dict:
        raise StreamProtocolError("sent a stream event that is not a JSON object")
    choices = obj.get("choices")
    if (
        ids is not None
        and type(choices) is list
        and choices
        and "error" not in obj
        and ids.other(obj.get("id"), choices, obj.get("model"))
    ):
        if parsed is not None:
            parsed.append(SPLICED)
        return SPLICED
    if parsed is not None:
        parsed.append(obj)
    garbage = (usage := obj.get("usage")) is not None and absurd_usage(usage)
    if garbage:
        obj["usage"] = repaired_usage(usage)  # else None: the stream is counted from its text instead
    if choices is None:
        if _other_apis_event(obj.get("type")) and "error" not in obj:
            # Another API's event (Anthropic's `message_start`, a Responses event): relayed, it
            # reached an OpenAI client as a 200 it cannot read; its whole JSON answer fails over.
            # Only those: a server's own `{"type": "ping"}` goes on as it did.
            raise StreamProtocolError("sent a stream event of another API, not a chat chunk")
        return obj if garbage or repaired else None
    if type(choices) is list:
        unnumbered = False
        closing = False  # a choice that finishes, or is not choice 0: what `open_choices` looks at
        for c in choices:
            if type(c) is not dict or type(delta := c.get("delta", _EMPTY)) is not dict:
                break
            if texts and "delta" in c:
                raise StreamProtocolError("sent a chat chunk in a completions stream")
            if (calls := delta.get("tool_calls")) and type(calls) is list:
                unnumbered = unnumbered or any(type(tc) is dict and tc.get("index") is None for tc in calls)
                if any(type(tc) is dict and type(i := tc.get("index")) is int and i >= MAX_TOOL_CALLS for tc in calls):
                    raise TooManyToolCalls()
            closing = closing or bool(c.get("finish_reason") or c.get("index"))
        else:
            # Looked at only once a choice has finished, or one is not choice 0: an event of
            # the one choice's content (nearly every event) costs no more.
            if (
                open_choices is not None
                and (closing or open_choices.finished)
                and (kept := open_choices.keep(obj, choices)) is not None
            ):
                return kept
            return obj if unnumbered or garbage or repaired else None
    raise StreamProtocolError("sent a stream event whose choices are not objects with a delta object")


_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _surrogates_replaced(data: bytes) -> Any:
    """An event orjson refused for a UTF-16 surrogate escape alone (`\\ud83c`: a server that
    detokenizes per token split an emoji over two deltas), read as the OpenAI SDK reads it, each
    lone surrogate made U+FFFD: the answer goes on, where the stream was cut. None if it is not
    such an event."""
    if _LONE_SURROGATE.search(data) is None:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return _without_lone_surrogates(obj)


def _without_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {k: _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    return value


_OTHER_APIS = frozenset({"message_start", "message_delta", "message_stop"})


def _other_apis_event(kind: Any) -> bool:
    """Whether an event's `type` is one of Anthropic's Messages or OpenAI's Responses events."""
    return type(kind) is str and (kind in _OTHER_APIS or kind.startswith(("content_block_", "response.")))


class ToolCallSlots:
    """Which call each tool-call delta of a chat stream belongs to (its `index`).

    OpenAI numbers the deltas; Gemini's OpenAI-compatible API, and proxies in front of it,
    send none, each call whole in one delta with its own id. Read as index 0, parallel calls
    were merged into one, their arguments run together (`{...}{...}`): an Anthropic client's
    SDK kept the first and dropped the rest, a Responses client got arguments that are not
    JSON. Without an index, a delta with an id not seen before opens the next call; one
    without an id goes on with the last.
    """

    __slots__ = ("_ids", "_last", "_top")

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._last = 0
        self._top = -1

    def of(self, delta: Mapping[str, Any]) -> int:
        cid = delta.get("id")
        cid = cid if isinstance(cid, str) and cid else None
        if delta.get("index") is not None:
            i = int(delta["index"])
        elif cid is not None:
            i = self._ids.get(cid, self._top + 1)
        else:
            i = self._last if self._top >= 0 else 0
        if cid is not None:
            self._ids.setdefault(cid, i)
        self._last, self._top = i, max(self._top, i)
        return i


_EMPTY: dict[str, Any] = {}


def event_data(event: bytes) -> bytes | None:
    """The concatenated `data:` payload of one event, or None if it has none."""
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def error_event(message: str, code: str, etype: str = "upstream_error") -> bytes:
    """An in-stream error in the shape the OpenAI SDKs raise on (its message redacted)."""
    body: dict[str, Any] = {"error": {"message": redact.message(message), "type": etype, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


# `"error"` anywhere but as the value of a content field: a key, or a value that marks an error
# (`"type": "error"`, `"object": "error"`). A model's text that is the word itself encodes to
# `"error"` too (`"content":"error"`); any other text holding it escapes its quotes. A key whose
# value is null is no error: every Responses `response.completed` says `"error": null`, and was
# redacted whole, its answer included (a 900 KB one cost the loop 0.8 s).
_CONTENT_FIELDS = (
    b"content",
    b"text",
    b"delta",
    b"refusal",
    b"thinking",
    b"reasoning",
    b"reasoning_content",
    b"partial_json",
)
_ERROR_KEY = re.compile(
    b"".join(b"(?<!%s)" % re.escape(b'"' + f + b'"' + sep) for f in _CONTENT_FIELDS for sep in (b":", b": "))
    + b'"error"(?!\\s*:\\s*null)'
)


def has_error_key(data: bytes) -> bool:
    """Whether `data` may hold an error event; a stream's content pays one substring search."""
    return data.find(b'"error"') >= 0 and _ERROR_KEY.search(data) is not None


def redact_errors(chunk: bytes) -> bytes:
    """Whole stream events with the credentials an upstream's error event may quote redacted.

    Only chunks that may carry an `"error"` key are decoded (`has_error_key`): the answer's
    content is never scanned, a model's text that says `error` included. `chunk` must hold
    whole events (see :class:`RelayGuard`): a secret, or the `"error"` key, split over two
    chunks matches in neither."""
    return _redact_bytes(chunk) if has_error_key(chunk) else chunk


def _redact_bytes(data: bytes) -> bytes:
    # surrogateescape: a UTF-8 sequence cut at a piece's edge goes out as the bytes it was.
    return redact.outbound(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def is_error_event(obj: Any) -> TypeGuard[dict[str, Any]]:
    """Whether a stream event's object is an error event: an OpenAI chunk `{"error": ...}`, an
    Anthropic or Responses event of type `error`."""
    return isinstance(obj, dict) and (obj.get("type") == "error" or ("type" not in obj and bool(obj.get("error"))))


# An upstream's error event relayed past this is rebuilt small before it is redacted (real ones
# are a few hundred bytes). Redacted whole, one of 150,000 short escaped strings (held up to
# :data:`HOLD_BYTES`) took the event loop ~1 s; this much of such text, ~10 ms.
ERROR_EVENT_BYTES = 16 << 10
_ERROR_FIELD_CHARS = 256  # a rebuilt error's text field other than its message (`redact.MAX_MESSAGE`)
_ERROR_FIELDS = 16  # the fields kept of a rebuilt error event, and of its `error` object


def _redacted_events(data: bytes) -> bytes:
    """`_redact_bytes` of whole events (the last may lack its blank line: a stream's end), each
    error event past :data:`ERROR_EVENT_BYTES` rebuilt small first (`_bounded_error_event`).
    Looked at only in data that long: the common error event is redacted as it was spelled."""
    if len(data) <= ERROR_EVENT_BYTES:
        return _redact_bytes(data)
    events, rest = split_events(data)
    events.append(rest)
    large = ((i, ev) for i, ev in enumerate(events) if len(ev) > ERROR_EVENT_BYTES)
    small = {i: b for i, ev in large if (b := _bounded_error_event(ev)) is not None}
    if not small:
        return _redact_bytes(data)
    last = len(events) - 1
    return b"".join(
        (small[i] if i in small else redact_errors(ev)) + (b"\n\n" if i < last or i in small else b"")
        for i, ev in enumerate(events)
    )


def _bounded_error_event(ev: bytes) -> bytes | None:
    """An error event (one, without its blank line) rebuilt from its first fields, redacted: its
    `message` cut to :data:`redact.MAX_MESSAGE` characters with a marker (`redact.message`, which
    cuts before a word or a known secret the limit would split), its other text fields to
    :data:`_ERROR_FIELD_CHARS`, its lists and deeper objects (`details`) left out, in the shape
    it came in (OpenAI's `{"error": {...}}`, Anthropic's and Responses' `type: error`). The strings
    are cut decoded, so no escape is split. None if `ev` is not an error event."""
    data = event_data(ev)
    if data is None or not has_error_key(data):
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not is_error_event(obj):
        return None
    name = ev[: ev.find(b"\n")] if ev.startswith(b"event:") else b""
    head = _redact_bytes(name) + b"\n" if 0 < len(name) <= 64 else b""
    return head + b"data: " + orjson.dumps(_bounded_fields(obj, top=True))


def _bounded_fields(obj: dict[str, Any], top: bool) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for k, v in obj.items():
        if len(kept) >= _ERROR_FIELDS:
            break
        if len(k) > 64:
            continue
        if isinstance(v, str):
            v = redact.message(v) if k == "message" else redact.outbound(redact.cut(v, _ERROR_FIELD_CHARS))
        elif isinstance(v, dict):
            if not (top and k == "error"):
                continue
            v = _bounded_fields(v, top=False)
        elif isinstance(v, list):
            continue
        kept[redact.outbound(k)] = v
    return kept


# A blank line, whatever the line ends (LF, CRLF, CR): in an event stream, these bytes occur
# only where an event ends.
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\n\r\n")
OVERLAP_BYTES = 8192


class RelayGuard:
    """What a relay may send of an upstream's stream: whole events, an error event redacted whole.

    Network reads split a stream anywhere: inside an error event, its `"error"` key or the
    secret it quotes, inside a UTF-8 sequence. Redacting each read on its own let both halves
    of a key through. The guard holds back the unfinished event at the end of each read (the
    client cannot act on half an event anyway) and redacts complete ones. The common read,
    ending where an event ends, costs what it did: one suffix test and one substring search.

    An error event past :data:`ERROR_EVENT_BYTES` goes rebuilt from its first fields, its
    message cut (`_bounded_error_event`): redacting it whole cost the event loop up to a second.
    An error event is held until it ends, up to :data:`HOLD_BYTES`: past it, :meth:`feed`
    raises :class:`EventTooLarge` (the relay ends the stream with its own error event; the held
    bytes are dropped, never relayed unredacted). An upstream that opened an error event and
    never ended it was held in memory, without bound, until the request's total timeout.
    Any other event still unfinished past :data:`HOLD_BYTES` (no provider sends one) is sent in
    pieces, unscanned like all content, keeping its last :data:`OVERLAP_BYTES` back, so that an
    `"error"` key arriving later is still seen whole; what such an event said before its first
    megabyte has gone out as it was.
    """

    __slots__ = ("_error", "_held", "_size", "error_key")

    def __init__(self) -> None:
        self._held: list[bytes] = []  # the unfinished event, as read (joined once it ends)
        self._size = 0
        self._error = False  # it has shown an `"error"` key: held whole, however long
        # What the last `feed` returned may hold an error event (`has_error_key`): the relay
        # looks for one only then, rather than searching every chunk a second time.
        self.error_key = False

    def feed(self, chunk: bytes) -> bytes:
        """The part of the stream so far that may be sent now (all of `chunk` if it ends an event)."""
        if not self._held:
            if chunk.endswith(_EVENT_ENDS):
                self.error_key = has_error_key(chunk)
                return _redacted_events(chunk) if self.error_key else chunk
            end = _last_end(chunk)
            whole, rest = self._redacted(chunk[:end]), chunk[end:]
            self._error = rest.find(b'"error"') >= 0
        else:
            # Only the new bytes are searched (and the few before them a marker may straddle):
            # an event read in many small pieces costs linear time, not quadratic.
            before = self._held[-1][-6:]
            end = _last_end(before + chunk) - len(before)
            if end <= 0:
                self._error = self._error or (before + chunk).find(b'"error"') >= 0
                self._held.append(chunk)
                self._size += len(chunk)
                self.error_key = False  # the start of an event too long to hold shows none (`_overflow`)
                return self._overflow()
            self._held.append(chunk[:end])
            whole, rest = self._redacted(b"".join(self._held)), chunk[end:]
            self._error = rest.find(b'"error"') >= 0
        if rest:
            self._held, self._size = [rest], len(rest)
            return whole + self._overflow()
        self._held, self._size = [], 0
        return whole

    def _redacted(self, whole: bytes) -> bytes:
        """`redact_errors`, noting in `error_key` whether `whole` may hold an error event."""
        self.error_key = has_error_key(whole)
        return _redacted_events(whole) if self.error_key else whole

    def _overflow(self) -> bytes:
        """The start of an unfinished event past :data:`HOLD_BYTES` that is no error event
        (an error event that long: :class:`EventTooLarge`)."""
        if self._size <= HOLD_BYTES:
            return b""
        if self._error:
            raise EventTooLarge(HOLD_BYTES, "error event")
        held = b"".join(self._held)
        self._held, self._size = [held[-OVERLAP_BYTES:]], OVERLAP_BYTES
        return held[:-OVERLAP_BYTES]

    def close(self) -> bytes:
        """What is left when the stream ended normally (an event without its blank line)."""
        rest = b"".join(self._held)
        self.drop()
        return self._redacted(rest)

    def drop(self) -> None:
        """Forgets an event the upstream left unfinished (the stream broke): a client reads
        half an event as garbage, not as the error event that follows it."""
        self._held, self._size, self._error = [], 0, False


def _last_end(data: bytes) -> int:
    """Where the last complete event in `data` ends (0: none does)."""
    at = data.rfind(b"\n\n")
    end = at + 2 if at >= 0 else 0
    if data.find(b"\r") >= 0:  # CR or CRLF line ends
        for e in _EVENT_ENDS[1:]:
            if (at := data.rfind(e)) >= 0:
                end = max(end, at + len(e))
    return end


# `"usage":{` as any JSON writer spells it (Python's json.dumps writes `"usage": {`).
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def without_usage_chunks(data: bytes) -> bytes:
    """`data` (whole events) without the chunks that carry only usage (`choices` empty): what an
    upstream sends when asked `stream_options.include_usage`, for a client that did not ask."""
    if data.find(b'"usage"') < 0 or not _USAGE_OBJECT.search(data):  # the common chunk: one substring search
        return data
    events, rest = split_events(data)
    kept = []
    for ev in events:
        payload = event_data(ev)
        if payload is not None and _USAGE_OBJECT.search(payload):
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
                continue
        kept.append(ev + b"\n\n")
    return b"".join(kept) + rest


def find_usage(tail: bytes) -> dict[str, Any] | None:
    """The last non-null `usage` object among the complete events in `tail` (written with
    spaces too: searched as `"usage":{` alone, it was missed and the answer counted from its
    visible text)."""
    # From the end: the last `"usage"` that opens an object (a regex over the whole tail, up
    # to 8 KiB a stream, cost more than the rest of its costing).
    end = len(tail)
    while True:
        idx = tail.rfind(b'"usage"', 0, end)
        if idx < 0:
            return None
        if _USAGE_OBJECT.match(tail, idx) is not None:
            break
        end = idx
    start = tail.rfind(b"data:", 0, idx)
    end = tail.find(b"\n", idx)
    if start < 0:
        return None
    try:
        obj = orjson.loads(tail[start + 5 : end if end >= 0 else len(tail)])
    except orjson.JSONDecodeError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None
