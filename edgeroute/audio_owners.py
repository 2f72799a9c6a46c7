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
bound, checked or parsed. With them, a request without `"audio"` and without a backslash-u
escape that could spell it (`"\\u0061udio"`) is not parsed either; an answer (the upstream's
own) only when it holds `"audio"`: one spelling the key with escapes leaves its audio unbound,
refused later (safe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from edgeroute import sse
from edgeroute.errors import ProxyError
from edgeroute.owners import MAX_ID, bind_all, owner_of, stored_owner
from edgeroute.state import Live

PREFIX = "audio:"  # in the response owners' table: no provider's response id starts so
_MARKER = b'"audio"'  # not `"input_audio"`: an input part's audio is the request's own
_ESCAPE = b"\\u"  # a request's key may be spelt with escapes: such a request is always parsed
THREAD_FROM_BYTES = 1 << 20  # a body this large is parsed in a worker thread


def _may_name(data: bytes) -> bool:
    """Whether a request may name audio (an access check must read escaped keys too)."""
    return _MARKER in data or _ESCAPE in data


def _audio_id(holder: Any) -> tuple[bool, Any]:
    """(whether `holder.audio` names audio by id, the id) for a message or a delta."""
    audio = holder.get("audio") if isinstance(holder, dict) else None
    if isinstance(audio, dict) and "id" in audio:
        return True, audio["id"]
    return False, None


def _named(body: bytes) -> list[tuple[Any, str]]:
    """The audio ids a chat request names (`messages[i].audio.id`), with where."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []  # the core answers a body that is not JSON
    messages = req.get("messages") if isinstance(req, dict) else None
    found = []
    for i, m in enumerate(messages if isinstance(messages, list) else ()):
        named, aid = _audio_id(m)
        if named:
            found.append((aid, f"messages[{i}].audio.id"))
    return found


def _not_found(aid: str, param: str) -> ProxyError:
    return ProxyError(404, f"Audio with id '{aid[:MAX_ID]}' not found.", code="audio_not_found", param=param)


async def check(request: web.Request, live: Live, body: bytes) -> None:
    """Refuses a chat request naming audio the caller's tenant was not given (see the module's doc)."""
    if not live.access.keyed(request) or not _may_name(body):
        return
    named = await asyncio.to_thread(_named, body) if len(body) >= THREAD_FROM_BYTES else _named(body)
    mine: set[str] = set()  # looked up once however often a history names it
    for aid, param in named:
        if not isinstance(aid, str):
            raise ProxyError(400, f"Invalid type for '{param}': expected a string.", param=param)
        if aid in mine:
            continue
        if not aid or len(aid) > MAX_ID:
            raise _not_found(aid, param)
        if await stored_owner(request, PREFIX + aid, "an audio id") != owner_of(request):
            raise _not_found(aid, param)
        mine.add(aid)


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


async def bind(request: web.Request, live: Live, ids: Iterable[str]) -> None:
    """Binds each audio id to the caller (see `owners.bind_all`)."""
    if live.access.keyed(request):
        await bind_all(request, {PREFIX: ids}, "an audio id")


class StreamAudio:
    """Wraps a chat stream's translator (the relay feeds it every upstream read) to see the audio
    ids its events give (`delta.audio.id`); `inner` is followed by the relay, as for any
    translator that wraps another. Only events holding `"audio"` are parsed again."""

    __slots__ = ("_events", "inner", "seen")

    def __init__(self, inner: Any, head: bytes) -> None:
        self.inner = inner
        self.seen: set[str] = set()
        self._events = sse.EventSplitter()
        self._read(head)

    @property
    def usage(self) -> Any:
        return self.inner.usage

    def feed(self, chunk: bytes) -> bytes:
        out: bytes = self.inner.feed(chunk)
        self._read(out)
        return out

    def _read(self, out: bytes) -> None:
        # Whole events without audio (what an upstream read almost always is) are not split; a
        # read that ends inside an event is, so that its rest, read next, is whole with it.
        if not self._events.holding and _MARKER not in out and out.endswith((b"\n\n", b"\r\n\r\n")):
            return
        for ev in self._events.feed(out):
            data = sse.event_data(ev)
            if data is None or _MARKER not in data:
                continue
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            choices = obj.get("choices") if isinstance(obj, dict) else None
            deltas = (c.get("delta") for c in (choices if isinstance(choices, list) else ()) if isinstance(c, dict))
            self.seen |= _ids(deltas)
