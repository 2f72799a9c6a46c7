"""Whose spoken answer an audio id names: a chat answer's audio confined to the tenant it was made for.

A chat completion asked for audio (`modalities: ["text", "audio"]`) gives its audio an id
(`choices[].message.audio.id`; a stream's `delta.audio.id`), and the provider keeps the audio
under it, in the account every tenant of the gateway shares: a later turn sends the assistant
message back as `{"role": "assistant", "audio": {"id": ...}}` and the model hears that audio
again. So each audio id an answer gives is bound to who made the request (the same owner as a
Responses id, `owners.owner_of`), in the same table (`gov_response_owners`, under an
`audio:` prefix: SQLite or PostgreSQL, shared by workers and instances, kept across restarts).
A request naming audio bound to someone else, or to no one, is a 404 in OpenAI's format:
whether it exists is not revealed.

A JSON answer's audio is bound before it is sent; a stream's after its last event is written
and before its end reaches the client (a stream cut before then leaves its audio unbound:
refused later, never another tenant's). Without virtual keys there is one tenant: nothing is
bound or checked. A request without `"audio"` and without a backslash-u escape that could
spell it (`"\\u0061udio"`) is not parsed; an answer (the upstream's
own) only when it holds `"audio"`: one spelling the key with escapes leaves its audio unbound,
refused later (safe).

The provider bills the audio a request names as prompt tokens, each time it is named (a
history naming its spoken turns reads each again), though none of it is in the request's
text. So each id is bound with its clip's size (the answer's audio tokens, from its usage:
`completion_tokens_details.audio_tokens`), and `check` returns what the references add to the
prompt (`Named`): the sizes known, and the references of unknown size (an id bound by an
earlier release, an answer whose usage counts no audio apart, every id on a server without
virtual keys, which binds nothing), which the decision reserves at the audio allowance
(`cost.media.audio_allowance`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from edgeroute import sse
from edgeroute.accounting import Usage
from edgeroute.errors import ProxyError, checked_json
from edgeroute.owners import MAX_ID, bind_all, owner_of, stored_binding
from edgeroute.state import Live

PREFIX = "audio:"  # in the response owners' table: no provider's response id starts so
_MARKER = b'"audio"'  # not `"input_audio"`: an input part's audio is the request's own
_ESCAPE = b"\\u"  # a request's key may be spelt with escapes (`_ESCAPED`)
_USAGE = b'"usage"'
_MOST = 2**32 - 1  # the core counts prompts in 32 bits
THREAD_FROM_BYTES = 1 << 20  # a body this large is parsed in a worker thread


# `"audio"` with some of its letters escaped (`"\\u0061udio"`), as every JSON parser reads it.
_ESCAPED = re.compile(rb'"(?:a|\\u0061)(?:u|\\u0075)(?:d|\\u0064)(?:i|\\u0069)(?:o|\\u006[fF])"')


def _may_name(data: bytes) -> bool:
    """Whether a request may name audio (an access check must read escaped keys too): a body
    with non-ASCII text escaped (`\\u00e9`) is not parsed for that alone."""
    return _MARKER in data or (_ESCAPE in data and _ESCAPED.search(data) is not None)


def _audio_id(holder: Any) -> tuple[bool, Any]:
    """(whether `holder.audio` names audio by id, the id) for a message or a delta."""
    audio = holder.get("audio") if isinstance(holder, dict) else None
    if isinstance(audio, dict) and "id" in audio:
        return True, audio["id"]
    return False, None


def _named(body: bytes) -> list[tuple[Any, str]]:
    """The audio ids a chat request names (`messages[i].audio.id`), with where."""
    req = checked_json(body)  # one the core took may not parse here: refused, not unchecked
    messages = req.get("messages") if isinstance(req, dict) else None
    found = []
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        named, aid = _audio_id(m)
        if named:
            found.append((aid, f"messages[{i}].audio.id"))
    return found


def _not_found(aid: str, param: str) -> ProxyError:
    return ProxyError(404, f"Audio with id '{aid[:MAX_ID]}' not found.", code="audio_not_found", param=param)


@dataclass(frozen=True, slots=True)
class Named:
    """What the audio a request names adds to its prompt: the clips' sizes known (each
    reference counted: the provider bills each), and the references of unknown size."""

    tokens: int = 0
    unknown: int = 0


async def check(request: web.Request, live: Live, body: bytes) -> Named | None:
    """Refuses a chat request naming audio the caller's tenant was not given (see the module's
    doc); returns what the audio it names adds to its prompt (None: it names none)."""
    if not _may_name(body):
        return None
    named = await asyncio.to_thread(_named, body) if len(body) >= THREAD_FROM_BYTES else _named(body)
    if not named:
        return None
    if not live.access.keyed(request):
        return Named(unknown=len(named))  # one tenant: nothing bound, no size known
    sizes: dict[str, int | None] = {}  # looked up once however often a history names it
    for aid, param in named:
        if not isinstance(aid, str):
            raise ProxyError(400, f"Invalid type for '{param}': expected a string.", param=param)
        if aid in sizes:
            continue
        if not aid or len(aid) > MAX_ID:
            raise _not_found(aid, param)
        owner, size = await stored_binding(request, PREFIX + aid, "an audio id")
        if owner != owner_of(request):
            raise _not_found(aid, param)
        sizes[aid] = size
    each = [sizes[aid] for aid, _ in named]
    return Named(sum(n for n in each if n is not None), each.count(None))


def clip_tokens(usage: Usage | dict[str, Any] | None) -> int | None:
    """The audio tokens of an answer's clips as its usage reports them
    (`completion_tokens_details.audio_tokens`); None when it does not: an upstream that counts
    no audio apart gives no size to trust (the allowance is reserved for its clips)."""
    if isinstance(usage, dict):
        usage = Usage.from_openai(usage, answered=True)
    if usage is None or usage.estimated or not usage.audio_completion_tokens:
        return None
    return min(usage.audio_completion_tokens, _MOST)


def answer_ids(body: bytes) -> set[str]:
    """The audio ids of a chat completion (`choices[].message.audio.id`)."""
    if _MARKER not in body:
        return set()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return set()
    choices = obj.get("choices") if isinstance(obj, dict) else None
    return _ids(c.get("message") for c in (choices if isinstance(choices, list) else ()) if isinstance(c, dict))


def _ids(holders: Iterable[Any]) -> set[str]:
    return {aid for h in holders if (got := _audio_id(h))[0] and isinstance(aid := got[1], str) and aid}


async def bind(request: web.Request, live: Live, ids: Iterable[str], size: int | None = None) -> None:
    """Binds each audio id to the caller with the clip's `size` when known (see `owners.bind_all`)."""
    if live.access.keyed(request):
        sizes = None if size is None else {PREFIX + aid: size for aid in ids}
        await bind_all(request, {PREFIX: ids}, "an audio id", sizes)


class StreamAudio:
    """Wraps a chat stream's translator (the relay feeds it every upstream read) to see the audio
    ids its events give (`delta.audio.id`) and, once it gave one, the usage its clips are sized
    by; `inner` is followed by the relay, as for any translator that wraps another. Only events
    holding `"audio"` (or a usage, after an audio id) are parsed again."""

    __slots__ = ("_events", "inner", "seen", "tokens")

    def __init__(self, inner: Any, head: bytes) -> None:
        self.inner = inner
        self.seen: set[str] = set()
        self.tokens: int | None = None  # the clips' audio tokens, by the stream's usage
        self._events = sse.EventSplitter()
        self._read(head)

    @property
    def usage(self) -> Any:
        return self.inner.usage

    def feed(self, chunk: bytes) -> bytes:
        out: bytes = self.inner.feed(chunk)
        self._read(out)
        return out

    async def bind(self, request: web.Request, live: Live) -> None:
        """Binds the ids seen with their size (the stream's last event has been written)."""
        await bind(request, live, self.seen, self.tokens)

    def _wanted(self, data: bytes) -> bool:
        return _MARKER in data or (bool(self.seen) and _USAGE in data)

    def _read(self, out: bytes) -> None:
        # Whole events without audio (what an upstream read almost always is) are not split; a
        # read that ends inside an event is, so that its rest, read next, is whole with it.
        if not self._events.holding and not self._wanted(out) and out.endswith((b"\n\n", b"\r\n\r\n")):
            return
        for ev in self._events.feed(out):
            data = sse.event_data(ev)
            if data is None or not self._wanted(data):
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            choices = obj.get("choices")
            deltas = (c.get("delta") for c in (choices if isinstance(choices, list) else ()) if isinstance(c, dict))
            self.seen |= _ids(deltas)
            if self.seen and isinstance(usage := obj.get("usage"), dict):
                self.tokens = clip_tokens(usage)
