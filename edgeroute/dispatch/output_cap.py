"""The end of a stream whose upstream ignores the request's completion bound.

A request's reservation (and any budget it passes) is priced at its `max_tokens` (or
`max_completion_tokens`, Responses' `max_output_tokens`), times `n`. An upstream that ignores
the bound streamed on without limit, every token relayed and billed: one stream with
`max_tokens: 5` spent twenty times a $1 budget. A stream whose relayed output (content, tool
calls, reasoning) is certainly past the bound by a margin is ended here, the client told in its
API's format that the answer stopped at its length, the upstream's connection closed.

"Certainly": the output is counted exactly with the route's tokenizer, and only past twice the
bound and `MARGIN_TOKENS` more (another model's tokenizer counts the same text otherwise; never
by half). Nothing is looked at before the relayed bytes could hold that many tokens (a token is
at least a byte of text, its event many more); then the JSON strings that may hold text are
measured by a regular expression (about 3 ns a byte, no parse), and the text is read and
counted only once those bytes pass the limit, again each time the stream grows by half: an
answer well within its bound is never parsed nor counted, one near it a few times.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from edgeroute import _core
from edgeroute.accounting import stream_objects, stream_parts

MARGIN_TOKENS = 64
# Text past this is counted in a worker thread (as a usage-less stream's count is).
_OFF_LOOP_CHARS = 16 * 1024
_ANTHROPIC = frozenset({"content_block_start", "content_block_delta", "content_block_stop"})
# The JSON strings an answer's text may be in (an upper bound of its bytes: escapes only lengthen).
_STRINGS = re.compile(
    rb'"(?:content|refusal|text|arguments|name|delta|partial_json|thinking|reasoning_content|reasoning)"'
    rb'\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
# A chat or completions event's own fields, read from the start of the stream's first event: an
# end needs them, and an event past `Transcript`'s tail (one of 2,000 tokens) is not in it whole.
_ENVELOPE = re.compile(rb'"(id|object|model)"\s*:\s*"([^"\\]{0,200})"|"(created)"\s*:\s*(\d{1,12})')
_HELD_BYTES = 256 * 1024  # events held unread past this are read (a long stream's, most under its limit)


def output_limit(max_tokens: int | None, choices: int) -> int | None:
    """The output tokens past which a stream is ended, or None when the request sets no bound."""
    if not max_tokens or max_tokens < 1:
        return None
    return 2 * max_tokens * max(1, choices) + MARGIN_TOKENS


class OutputCap:
    """A stream's relayed output, measured against its limit (see the module's docstring)."""

    __slots__ = (
        "_check_at",
        "_encoding",
        "_envelope",
        "_events",
        "_fresh",
        "_held",
        "_held_size",
        "_seen",
        "_text",
        "_upper",
        "limit",
        "tokens",
    )

    def __init__(self, limit: int, encoding: str) -> None:
        self.limit = limit
        self._encoding = encoding
        self._seen = 0  # bytes relayed
        self._check_at = limit  # fewer bytes cannot hold `limit` tokens
        self._fresh: list[bytes] = []  # relayed since the last look
        self._held: list[bytes] = []  # looked at (whole lines, or their strings), not yet read for their text
        self._held_size = 0
        self._upper = 0  # the bytes of the strings that may be text: at least the text's, so its tokens'
        self._text: list[str] | None = None  # the text, once read (`_upper` past the limit)
        self._events: bool | None = None  # whether the whole events are held (Responses), else their strings
        self.tokens = 0  # the last count
        self._envelope: dict[str, Any] = {}  # the first event's id, object, created and model

    def add(self, chunk: bytes) -> bool:
        """Takes what was relayed; True when it is time to look at it (`past`)."""
        self._fresh.append(chunk)
        self._seen += len(chunk)
        return self._seen >= self._check_at

    async def past(self) -> bool:
        """Whether the output relayed so far is past the limit. Its strings are measured first (a
        regular expression, no parse); only past the limit is the text read and counted (in a
        worker thread if long), which most answers never are."""
        raw = b"".join(self._fresh)
        cut = raw.rfind(b"\n") + 1  # whole lines only: the rest waits for its end
        self._fresh = [raw[cut:]] if cut < len(raw) else []
        whole = raw[:cut]
        strings = _STRINGS.findall(whole)
        self._upper += sum(map(len, strings))
        if self._events is None:  # the first look (the head's events) says the format
            # Responses events repeat the text in their `done` events: their text is read by a parse.
            self._events = b'"response.' in whole
            if (at := whole.find(b"data: {")) >= 0:
                for m in _ENVELOPE.finditer(whole, at, at + 512):
                    if m.group(3):
                        self._envelope.setdefault("created", int(m.group(4)))
                    else:
                        self._envelope.setdefault(m.group(1).decode(), m.group(2).decode(errors="replace"))
        held = [whole] if self._events else strings
        self._held += held
        self._held_size += sum(map(len, held))
        if self._text is None and self._upper <= self.limit:
            if self._held_size > _HELD_BYTES:  # read now, its events dropped: bounded memory
                self._read()
            # Looked at again once the bytes to come could pass the limit, or a quarter more came
            # (a look costs a microsecond or two beside its bytes: not one an event near the limit).
            self._check_at = self._seen + max(self.limit - self._upper, self._seen // 4)
            return False
        text = self._read()
        bound = len(text.encode())
        if bound > self.limit:
            if len(text) > _OFF_LOOP_CHARS:
                loop = asyncio.get_running_loop()
                self.tokens = await loop.run_in_executor(None, _core.Router.count_tokens, text, self._encoding)
            else:
                self.tokens = _core.Router.count_tokens(text, self._encoding)
            if self.tokens > self.limit:
                return True
            bound = self.tokens
        # No miss: the bytes to come hold at most as many tokens; at least half again (a few counts).
        self._check_at = self._seen + max(self.limit - bound, self._seen // 2)
        return False

    def _read(self) -> str:
        """The text relayed so far (what was held read, and dropped)."""
        held = self._held
        self._held, self._held_size = [], 0
        if self._events:
            parts = stream_parts(b"".join(held))
        else:  # the strings the expression found, as JSON strings: read in one parse
            parts = _strings(held)
        text = "".join((self._text or []) + parts)
        self._text = [text]
        return text

    def end(self, tail: bytes, prompt_tokens: int | None) -> bytes | None:
        """The events that end the stream at its length, in the relayed format (read from its
        `tail`; a chat stream's with its usage chunk, counted, given `prompt_tokens`); None for a
        format (Responses) whose end needs more than its tail (its translator makes it)."""
        last: dict[str, Any] | None = None
        indices: dict[int, None] = {}  # the chat choices seen, each ended
        blocks: dict[int, None] | None = None  # Anthropic's content blocks still open
        for obj in stream_objects(tail):
            kind, index = obj.get("type"), obj.get("index")
            if kind in _ANTHROPIC:
                blocks = {} if blocks is None else blocks
                if kind == "content_block_stop":
                    blocks.pop(index, None)  # type: ignore[arg-type]
                elif type(index) is int:
                    blocks[index] = None
            elif isinstance(choices := obj.get("choices"), list):
                last = obj
                indices.update(
                    (c["index"], None) for c in choices if isinstance(c, dict) and type(c.get("index")) is int
                )
        if blocks is not None:  # Anthropic's events, relayed as they are
            out = [_anthropic("content_block_stop", {"index": i}) for i in blocks]
            delta = {"stop_reason": "max_tokens", "stop_sequence": None}
            out.append(_anthropic("message_delta", {"delta": delta, "usage": {"output_tokens": self.tokens}}))
            out.append(_anthropic("message_stop", {}))
            return b"".join(out)
        if last is None:  # no whole event in the tail: the first event's own fields
            if self._events or "object" not in self._envelope:
                return None
            last = self._envelope
        text = last.get("object") == "text_completion"
        base = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        out = []
        for i in indices or (0,):
            choice: dict[str, Any] = {"index": i, "finish_reason": "length"}
            if text:
                choice["text"] = ""
            else:
                choice["delta"] = {}
            out.append(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
        if prompt_tokens is not None:  # asked for (Anthropic's message_delta carries it)
            done = self.tokens
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
            out.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        return b"".join(out) + b"data: [DONE]\n\n"


def _strings(found: list[bytes]) -> list[str]:
    """The JSON strings' bodies `_STRINGS` found, read (escapes undone): one parse of them all, else
    each alone, one that is not JSON left out (a count from fewer is still a lower bound)."""
    try:
        got = orjson.loads(b'["' + b'","'.join(found) + b'"]')
    except orjson.JSONDecodeError:
        got = []
        for s in found:
            try:
                got.append(orjson.loads(b'"' + s + b'"'))
            except orjson.JSONDecodeError:
                continue
    return [s for s in got if isinstance(s, str)]


def _anthropic(kind: str, fields: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
