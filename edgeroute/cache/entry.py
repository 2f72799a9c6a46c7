"""A cached answer, kept as one OpenAI chat completion whichever way it arrived.

A streamed answer is folded into a completion once it has ended cleanly (`[DONE]`, no
error event): never a partial one. Either form is served back either way: as the JSON
completion, or replayed as a stream in OpenAI's chunk framing (a role chunk, content in
pieces, tool calls with their arguments, the finish, usage when asked for, `[DONE]`), so
a streaming SDK cannot tell a hit from a miss but by speed and the header.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from edgeroute import sse
from edgeroute.cache.settings import MAX_ENTRY_BYTES

_PIECE = 48  # characters of text per replayed chunk: streaming clients render it as it comes


# Bytes an in-memory entry costs beyond its body and names (its key, the entry, its record and
# its place in its tenant's LRU order), for the bound: 411 to 427 measured as the dicts fill
# (`python -m edgeroute.cache.evaluate --memory`; 385 with one LRU for every tenant), 24 more
# since an entry names its key (the store's own string) and tenant; it was 200, and a store at
# its `max_bytes` held about a fifth more than that.
_OVERHEAD = 464
# The most a stored entry may inflate to (the largest `max_entry_bytes`, and its header): past
# it, what Redis holds was not written by edgeroute (a compression bomb: a few kilobytes that
# inflate to gigabytes, on the event loop) and is a corrupt entry.
MAX_STORED_BYTES = MAX_ENTRY_BYTES + 4096


def inflate(data: bytes, limit: int) -> bytes:
    """`data` decompressed (zlib); ValueError when that is more than `limit` bytes, which is
    found out after `limit` bytes, not after all of them."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ValueError(f"not compressed data: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ValueError(f"inflates to more than {limit} bytes")
    if not d.eof:
        raise ValueError("truncated compressed data")
    return out


# What a stored entry's fields may be (`Entry.loads`): edgeroute writes nothing outside these,
# so an entry outside them was planted in or corrupted by the shared store. Names (deployment,
# what it was, request id, key, tenant) are short; a cost is finite and below what any one
# call costs; a date is not ahead of this host's clock by more than instances' clocks differ.
_MAX_NAME = 512
MAX_COST_USD = 10_000.0
CLOCK_SKEW_S = 300.0
VERSION = 5


class InvalidEntry(ValueError):
    """An entry that decodes but that edgeroute did not write so (counted apart from one that
    does not decode: `CacheCounters.invalid`)."""


@dataclass(slots=True, frozen=True)
class Entry:
    body: bytes  # an OpenAI `chat.completion` (or, for /v1/embeddings, `list` of embeddings) as JSON, sent as it is
    deployment: str  # who produced it: a request may reuse it only if it could have been sent there
    created: float  # unix time it was stored
    cost_usd: float  # what producing it cost: what each hit saves
    # What the deployment was then (`DeploymentInfo.cached_as`): a reload that keeps its name but points it at
    # another model or provider must not serve the old model's answers under the new one.
    upstream: str = ""
    writer: str = ""  # the id of the request whose answer it is
    # Given by a fallback model (outside the route's own deployments) while the route's failed:
    # never a fresh hit (the client asked for the route's model), only a stale-if-error answer.
    fallback: bool = False
    # The cache key it is stored under and the tenant whose entries it is (`service.tenant_of`):
    # a read checks both, so that an entry copied under another request's key (another
    # tenant's answer, another model's) in the shared store is never served as that request's.
    key: str = ""
    tenant: str = ""
    kind: str = "chat"  # or "embeddings": what its body is (not stored: read from the body)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.created)

    def size(self) -> int:
        names = len(self.deployment) + len(self.upstream) + len(self.writer) + len(self.tenant)
        return len(self.body) + names + _OVERHEAD

    def dumps(self) -> bytes:
        """The stored form: a small JSON header line, then the body, compressed."""
        fields = [self.deployment, self.created, self.cost_usd, self.upstream, self.writer, self.fallback]
        head = orjson.dumps([VERSION, *fields, self.key, self.tenant])
        return zlib.compress(head + b"\n" + self.body, 1)

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        """Raises ValueError on anything that does not decode to an entry of this version (an
        earlier release's entries, which name no key, are read so too: they are asked again
        once), InvalidEntry on one that decodes to fields or a body edgeroute does not write."""
        try:
            raw = inflate(data, MAX_STORED_BYTES)
            head, _, body = raw.partition(b"\n")
            fields = orjson.loads(head)
        except (orjson.JSONDecodeError, ValueError) as e:
            raise ValueError(f"unreadable cache entry: {e}") from None
        if not isinstance(fields, list) or len(fields) != 9 or fields[0] != VERSION:
            raise ValueError("unreadable cache entry: unknown format")
        _, deployment, created, cost, upstream, writer, fallback, key, tenant = fields
        if not all(isinstance(n, str) and len(n) <= _MAX_NAME for n in (deployment, upstream, writer, key, tenant)):
            raise InvalidEntry("cache entry: bad names")
        if not _number(created) or not 0 < created <= time.time() + CLOCK_SKEW_S:
            raise InvalidEntry("cache entry: bad date")
        if not _number(cost) or not 0 <= cost <= MAX_COST_USD or not isinstance(fallback, bool):
            raise InvalidEntry("cache entry: bad fields")
        if (kind := kind_of(body)) is None:
            raise InvalidEntry("cache entry: not a finished chat completion or embeddings")
        # A date a little ahead (another instance's clock) counts from now: it must not stay fresh
        # for longer than its ttl.
        created = min(float(created), time.time())
        return cls(body, deployment, created, float(cost), upstream, writer, fallback, key, tenant, kind)

    def servable(self, allowed: Mapping[str, str]) -> bool:
        """Whether a request that may go to `allowed` (name: what it is now) may
        be answered with this entry: its deployment is among them and still what it was."""
        return allowed.get(self.deployment) == self.upstream

    def sse_body(self, include_usage: bool) -> bytes:
        """The answer replayed as an OpenAI-format stream."""
        return self.rendered(("sse", include_usage), partial(_render_sse, include_usage=include_usage))

    def rendered(self, form: Hashable, render: Callable[[bytes], bytes]) -> bytes:
        """The body in another form (a stream, another API's format): `render(body)`, which must
        depend on the body alone, `form` naming it. Rendered once per entry and form while the
        entry is hot, not once per hit."""
        return _REPLAYS.render(self.body, form, render)


def kind_of(body: bytes) -> str | None:
    """What an answer is, if it is one the cache keeps (and reads back): "chat" (a finished
    completion, `storable`), "embeddings", or None."""
    completion = completion_from_json(body)
    if completion is not None:
        return "chat" if storable(completion) else None
    return "embeddings" if embeddings_from_json(body) is not None else None


def storable(completion: dict[str, Any]) -> bool:
    """Whether a completion is one the cache keeps: finished (`finished`), its `usage` an
    object whose token counts are numbers, as a replay and the request log read them (other
    fields are a provider's own: Perplexity's `search_context_size` is a word)."""
    usage = completion.get("usage")
    if usage is not None and not (isinstance(usage, dict) and all(_count(k, v) for k, v in usage.items())):
        return False
    return finished(completion)


def _count(name: str, v: Any) -> bool:
    return v is None or isinstance(v, int | float | dict) or not name.endswith("_tokens")


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _render_sse(body: bytes, include_usage: bool) -> bytes:
    completion = orjson.loads(body)
    events = [b"data: " + orjson.dumps(c) + b"\n\n" for c in replay_chunks(completion, include_usage)]
    return b"".join(events) + sse.DONE + b"\n\n"


class _Replays:
    """Bodies rendered lately, by the stored body and the form (the body is the same bytes
    object on every hit of an entry, so finding it costs no hashing of the body after the
    first). Bounded by bytes, the bodies it keeps alive included; a large answer is rendered
    every time. Used from the event loop and from threads (a large hit renders off the loop):
    the memo's updates hold a lock, a render does not."""

    def __init__(self, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._done: OrderedDict[tuple[bytes, Hashable], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def render(self, body: bytes, form: Hashable, render: Callable[[bytes], bytes]) -> bytes:
        memo = (body, form)
        with self._lock:
            if (got := self._done.get(memo)) is not None:
                self._done.move_to_end(memo)
                return got
        got = render(body)
        size = len(body) + len(got)
        if size <= self.max_bytes // 16:
            with self._lock:
                if memo not in self._done:
                    self._done[memo] = got
                    self._bytes += size
                while self._bytes > self.max_bytes:
                    (old, _), gone = self._done.popitem(last=False)
                    self._bytes -= len(old) + len(gone)
        return got


_REPLAYS = _Replays()


def completion_from_json(body: bytes) -> dict[str, Any] | None:
    """The completion in a JSON answer, if it is one worth keeping (choices, no error)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("error") or not isinstance(obj.get("choices"), list):
        return None
    if not all(isinstance(c, dict) and _replayable(c) for c in obj["choices"]):
        return None
    return obj


# The message fields a replay gives back; any other that says something makes an answer one
# a replay would cut short. (OpenAI sends `annotations: []` and `audio: null` on most answers.)
_REPLAYED = frozenset({"role", "content", "refusal", "tool_calls"})
_EMPTY: tuple[Any, ...] = (None, [], {}, "")


def _replayable(choice: dict[str, Any]) -> bool:
    """Whether a choice is one `replay_chunks` gives back whole: text as strings, tool calls
    as OpenAI writes them, and no log probabilities (a replay does not carry them, and a
    client that asked for them must not be served an answer without). Anything else (some
    OpenAI-compatible servers send `arguments` as an object) is answered, never stored."""
    msg = choice.get("message")
    if not isinstance(msg, dict) or choice.get("logprobs") is not None:
        return False
    if any(v not in _EMPTY for k, v in msg.items() if k not in _REPLAYED):  # reasoning, annotations, audio ...
        return False
    if not all(msg.get(k) is None or isinstance(msg[k], str) for k in ("content", "refusal")):
        return False
    calls = msg.get("tool_calls")
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(tc, dict)
        and isinstance(fn := tc.get("function"), dict)
        and isinstance(fn.get("name"), str)
        and _arguments_object(fn.get("arguments"))
        for tc in calls
    )


def _arguments_object(arguments: Any) -> bool:
    """Whether a tool call's `arguments` is a JSON object's text (or empty), as every client
    reads it: one that is not was stored from a stream, and served to every later caller of
    the tenant for the entry's life (a 502 to an Anthropic client, which reads it as `input`)."""
    if not isinstance(arguments, str):
        return False
    if not arguments.strip():
        return True
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False


# Finish reasons of an answer that ended as the model meant it to. `length` (cut at a token
# limit), `content_filter` (withheld by a moderation verdict that may not hold next time),
# a missing or unknown reason: the answer is incomplete, and a later caller would be served
# the cut as if it were the whole answer (a replay says `stop` when the entry has none).
_COMPLETE = frozenset({"stop", "tool_calls", "function_call"})


def finished(completion: dict[str, Any]) -> bool:
    """Whether every choice of `completion` ended normally, so that it may be stored. A refusal
    (`message.refusal`) did not: it is a verdict as a content filter's is (an Anthropic refusal
    arrives as `content_filter`), often transient, and must not be pinned for the ttl. Nor did a
    choice with nothing in it (no text, no tool call): how a generation that went wrong reads
    once translated (Gemini's `MALFORMED_FUNCTION_CALL` says `stop`), which asking again mends."""
    choices = completion.get("choices") or ()
    return len(choices) > 0 and all(
        c.get("finish_reason") in _COMPLETE and not _refused(c) and _said(c) for c in choices
    )


def _refused(choice: dict[str, Any]) -> bool:
    msg = choice.get("message")
    return isinstance(msg, dict) and bool(msg.get("refusal"))


def _said(choice: dict[str, Any]) -> bool:
    msg = choice.get("message")
    return isinstance(msg, dict) and bool(msg.get("content") or msg.get("tool_calls"))


def embeddings_from_json(body: bytes) -> dict[str, Any] | None:
    """The embeddings list in a JSON answer of /v1/embeddings, if it is one worth keeping."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("object") != "list" or not isinstance(obj.get("data"), list):
        return None
    if not obj["data"] or not all(isinstance(d, dict) and "embedding" in d for d in obj["data"]):
        return None
    return obj


def completion_from_stream(data: bytes) -> dict[str, Any] | None:
    """Folds an OpenAI-format SSE stream into the completion it delivered; None unless it
    ended cleanly with `[DONE]` and carried no error event."""
    events, _ = sse.split_events(data if data.endswith(b"\n\n") else data + b"\n\n")
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    done = False
    for ev in events:
        payload = sse.event_data(ev)
        if payload is None:
            continue
        if payload == b"[DONE]":
            done = True
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(chunk, dict) or chunk.get("error"):
            return None
        for k in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if k in chunk and k not in head:
                head[k] = chunk[k]
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            if not isinstance(c, dict) or not isinstance(c.get("index", 0), int) or c.get("logprobs") is not None:
                return None  # (log probabilities: see `_replayable`)
            acc = choices.setdefault(c.get("index", 0), _empty_choice(c.get("index", 0)))
            if acc["finish_reason"] is None:  # what follows a choice's finish is none of its answer
                _fold_choice(acc, c)
    if not done or not choices or any(c["finish_reason"] is None or c["unreplayable"] for c in choices.values()):
        return None
    out: dict[str, Any] = {"id": head.get("id", ""), "object": "chat.completion", "created": head.get("created", 0)}
    out["model"] = head.get("model", "")
    if head.get("system_fingerprint") is not None:
        out["system_fingerprint"] = head["system_fingerprint"]
    out["choices"] = [_finish_choice(choices[i]) for i in sorted(choices)]
    if not all(_replayable(c) for c in out["choices"]):  # tool arguments that do not parse
        return None
    if usage is not None:
        out["usage"] = usage
    return out


def _empty_choice(index: int) -> dict[str, Any]:
    return {
        "index": index, "role": "assistant", "content": None, "refusal": None, "tools": {}, "finish_reason": None,
        "unreplayable": False,
    }  # fmt: skip


def _fold_choice(acc: dict[str, Any], c: dict[str, Any]) -> None:
    delta = c.get("delta") or {}
    if not isinstance(delta, dict):
        return
    if any(v not in _EMPTY for k, v in delta.items() if k not in _REPLAYED):
        acc["unreplayable"] = True  # see `_replayable`
    if isinstance(delta.get("role"), str):
        acc["role"] = delta["role"]
    for k in ("content", "refusal"):
        if isinstance(delta.get(k), str):
            acc[k] = (acc[k] or "") + delta[k]
    for tc in delta.get("tool_calls") or ():
        if not isinstance(tc, dict):
            continue
        t = acc["tools"].setdefault(tc.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": ""})
        if tc.get("id"):
            t["id"] = tc["id"]
        fn = tc.get("function") or {}
        if not isinstance(fn, dict) or not all(isinstance(fn.get(k) or "", str) for k in ("name", "arguments")):
            acc["unreplayable"] = True  # see `_replayable`
            return
        t["name"] += fn.get("name") or ""
        t["arguments"] += fn.get("arguments") or ""
    if c.get("finish_reason"):
        acc["finish_reason"] = c["finish_reason"]


def _finish_choice(acc: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": acc["role"], "content": acc["content"]}
    if acc["refusal"] is not None:
        message["refusal"] = acc["refusal"]
    if acc["tools"]:
        message["tool_calls"] = [
            {"id": t["id"], "type": t["type"], "function": {"name": t["name"], "arguments": t["arguments"]}}
            for _, t in sorted(acc["tools"].items())
        ]
    return {"index": acc["index"], "message": message, "logprobs": None, "finish_reason": acc["finish_reason"]}


def replay_chunks(completion: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a stream that delivers `completion`."""
    base = {"id": completion.get("id", ""), "object": "chat.completion.chunk", "created": completion.get("created", 0)}
    base["model"] = completion.get("model", "")
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return base | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        msg = choice.get("message") or {}
        yield chunk(index, {"role": msg.get("role", "assistant"), "content": ""})
        for field in ("content", "refusal"):
            text = msg.get(field)
            if isinstance(text, str):
                for i in range(0, len(text), _PIECE):
                    yield chunk(index, {field: text[i : i + _PIECE]})
        for n, tc in enumerate(msg.get("tool_calls") or ()):
            fn = tc.get("function") or {}
            yield chunk(
                index,
                {
                    "tool_calls": [
                        {
                            "index": n,
                            "id": tc.get("id"),
                            "type": tc.get("type", "function"),
                            "function": {"name": fn.get("name", ""), "arguments": ""},
                        }
                    ]
                },
            )
            args = fn.get("arguments") or ""
            for i in range(0, len(args), _PIECE):
                yield chunk(index, {"tool_calls": [{"index": n, "function": {"arguments": args[i : i + _PIECE]}}]})
        yield chunk(index, {}, choice.get("finish_reason") or "stop")
    if include_usage and completion.get("usage") is not None:
        yield base | {"choices": [], "usage": completion["usage"]}
