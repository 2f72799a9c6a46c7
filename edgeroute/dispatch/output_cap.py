"""The end of a stream whose upstream ignores the request's completion bound.

A request's reservation (and any budget it passes) is priced at its `max_tokens` (or
`max_completion_tokens`, Responses' `max_output_tokens`), times `n`. An upstream that ignores
the bound streamed on without limit, every token relayed and billed: one stream with
`max_tokens: 5` spent twenty times a $1 budget. A stream whose relayed output (content, tool
calls, reasoning) is certainly past the bound by a margin is ended here, the client told in its
API's format that the answer stopped at its length, the upstream's connection closed.

"Certainly": the output is counted exactly with the route's tokenizer, and only past twice the
bound and `MARGIN_TOKENS` more (another model's tokenizer counts the same text differently;
never by half). The count is made only when the relayed bytes could hold that many tokens (a
token is at least one byte of text, its event many more), then again each time the bytes grow
by half, so a stream is counted a few times at most and a short one never.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from edgeroute import _core
from edgeroute.accounting import stream_objects, stream_parts

MARGIN_TOKENS = 64
# Text past this is counted in a worker thread (as a usage-less stream's count is).
_OFF_LOOP_CHARS = 16 * 1024
_ANTHROPIC = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop"})


def output_limit(max_tokens: int | None, choices: int) -> int | None:
    """The output tokens past which a stream is ended, or None when the request sets no bound."""
    if not max_tokens or max_tokens < 1:
        return None
    return 2 * max_tokens * max(1, choices) + MARGIN_TOKENS


class OutputCap:
    """A stream's relayed output, measured against its limit (see the module's docstring)."""

    __slots__ = (
        *("_check_at", "_encoding", "_held", "_indices", "_open", "_seen", "_text", "_text_size"),
        *("chunk", "limit", "tokens"),
    )

    def __init__(self, limit: int, encoding: str, head: bytes) -> None:
        self.limit = limit
        self._encoding = encoding
        self._seen = 0  # bytes relayed
        self._check_at = limit  # fewer bytes cannot hold `limit` tokens
        self._held: list[bytes] = []  # relayed since the last look
        self._text: list[str] = []
        self._text_size = 0
        self.tokens = 0  # the last count
        self.chunk: dict[str, Any] | None = None  # the last chat or completion chunk (its id, model)
        self._indices: dict[int, None] = {}  # the chat choices seen, each ended
        self._open: dict[int, None] | None = None  # an Anthropic stream's open content blocks
        self.add(head)

    def add(self, chunk: bytes) -> bool:
        """Takes what was relayed; True when it is time to look at it (`past`)."""
        self._held.append(chunk)
        self._seen += len(chunk)
        return self._seen >= self._check_at

    async def past(self) -> bool:
        """Whether the output relayed so far is past the limit (counted, in a worker thread if long)."""
        raw = b"".join(self._held)
        cut = raw.rfind(b"\n") + 1  # whole lines only: the rest waits for its end
        self._held = [raw[cut:]] if cut < len(raw) else []
        self._read(raw[:cut])
        # Upper bounds first: a token is at least a character's byte.
        if self._text_size > self.limit:
            text = "".join(self._text)
            self._text = [text]
            if len(text) > _OFF_LOOP_CHARS:
                loop = asyncio.get_running_loop()
                self.tokens = await loop.run_in_executor(None, _core.Router.count_tokens, text, self._encoding)
            else:
                self.tokens = _core.Router.count_tokens(text, self._encoding)
            if self.tokens > self.limit:
                return True
        bound = self.tokens if self._text_size > self.limit else self._text_size
        # No miss: the bytes to come hold at most as many tokens; at least half again (a few counts).
        self._check_at = self._seen + max(self.limit - bound, self._seen // 2)
        return False

    def _read(self, data: bytes) -> None:
        parts = stream_parts(data)
        if b'"reasoning' in data:  # a chat stream's reasoning, billed as output
            for obj in stream_objects(data):
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    for k in ("reasoning_content", "reasoning"):
                        if isinstance(delta, dict) and isinstance(delta.get(k), str):
                            parts.append(delta[k])
        for p in parts:
            self._text.append(p)
            self._text_size += len(p.encode())
        if b'"choices"' in data or b"content_block_" in data:
            self._follow(data)

    def _follow(self, data: bytes) -> None:
        """What the end needs: the last chunk's id and model, or the Anthropic blocks left open."""
        for obj in stream_objects(data):
            kind = obj.get("type")
            if kind in _ANTHROPIC:
                blocks = self._open if self._open is not None else {}
                self._open = blocks
                if kind == "content_block_start" and type(obj.get("index")) is int:
                    blocks[obj["index"]] = None
                elif kind == "content_block_stop":
                    blocks.pop(obj.get("index"), None)  # type: ignore[arg-type]
            elif isinstance(choices := obj.get("choices"), list):
                self.chunk = obj
                for c in choices:
                    if isinstance(c, dict) and type(c.get("index")) is int:
                        self._indices[c["index"]] = None

    def end(self, prompt_tokens: int | None) -> bytes | None:
        """The events that end the stream at its length, in the relayed format (a chat stream's
        with its usage chunk, counted, given `prompt_tokens`); None for a format (Responses) whose
        end is an error event."""
        if self._open is not None:  # Anthropic's events, relayed as they are
            out = [_anthropic("content_block_stop", {"index": i}) for i in self._open]
            usage = {"output_tokens": self.tokens}
            out.append(
                _anthropic(
                    "message_delta", {"delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": usage}
                )
            )
            out.append(_anthropic("message_stop", {}))
            return b"".join(out)
        last = self.chunk
        if last is None:
            return None
        text = last.get("object") == "text_completion"
        base = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        out = []
        for i in self._indices or (0,):
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


def _anthropic(kind: str, fields: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
