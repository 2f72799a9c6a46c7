"""What a relayed stream said, kept in bounded memory: enough to cost it when it carries no
usage, and the whole stream for its completion callbacks (cache, request log, shadow) when
it is small enough for them.

A stream's events are tens of times the text they carry (an OpenAI chunk is ~200 bytes for a
token or two). Every event of every stream was kept until the stream ended: a thousand
concurrent 8k-token answers held over a gigabyte, and a client that asked for long streams
and read them slowly grew the proxy by megabytes a second. Now raw events are kept only up
to a bound (`COMPACT_BYTES`; `WHOLE_BYTES` when a callback wants the stream); past it, the
whole lines held are reduced to the text they carry, which is what costing counts.
"""

from __future__ import annotations

from edgeroute.accounting import Usage, counted_usage, stream_parts

# Raw events held when only costing needs them: most answers (under ~1,300 tokens) are never
# compacted, which parses every event (~2 µs each); a thousand long streams hold 256 MB at most.
COMPACT_BYTES = 256 * 1024
WHOLE_BYTES = 4 * 1024 * 1024  # raw events held for a completion callback (4x the cache's entry bound)
TAIL_BYTES = 8192  # the stream's end that `tail` gives (a usage event, `[DONE]`, well inside it)


class Transcript:
    """A stream's events as they are relayed (see the module's docstring)."""

    __slots__ = ("_before", "_limit", "_parts", "_raw", "_raw_size", "size", "whole")

    def __init__(self, head: bytes, *, keep_whole: bool) -> None:
        self._raw = [head]
        self._raw_size = len(head)
        self._limit = WHOLE_BYTES if keep_whole else COMPACT_BYTES
        self._parts: list[str] = []  # the text of the events compacted so far, a string a compaction
        self._before = b""  # the last bytes compacted (see `tail`)
        self.size = len(head)  # every byte relayed, compacted or not
        self.whole = True  # no event compacted: `stream()` is the stream as relayed

    def add(self, chunk: bytes) -> None:
        self._raw.append(chunk)
        self._raw_size += len(chunk)
        self.size += len(chunk)
        if self._raw_size > self._limit:
            self._compact()

    def _compact(self) -> None:
        """Reduces the whole lines held to their text (an event's `data:` line is one JSON
        object); a line not yet ended stays raw."""
        raw = b"".join(self._raw)
        cut = raw.rfind(b"\n") + 1
        self._before = (self._before + raw[max(0, cut - TAIL_BYTES) : cut])[-TAIL_BYTES:]
        self._parts.append("".join(stream_parts(raw[:cut])))  # one string: a token's is ~50 bytes
        rest = raw[cut:]
        self._raw = [rest]
        self._raw_size = len(rest)
        self.whole = False

    def tail(self, n: int = TAIL_BYTES) -> bytes:
        """The last `n` (at most `TAIL_BYTES`) bytes relayed, compacted or not: where a stream's
        usage and `[DONE]` are. Joined from the last pieces when asked for, rather than kept up
        to date by copying the tail at every event."""
        raw = self._raw
        size, i = 0, len(raw)
        while i > 0 and size < n:
            i -= 1
            size += len(raw[i])
        last = b"".join(raw[i:])
        return last[-n:] if size >= n else (self._before + last)[-n:]

    def stream(self) -> bytes | None:
        """The stream as relayed, if nothing of it was compacted."""
        return b"".join(self._raw) if self.whole else None

    def text(self) -> str:
        """What the model wrote in the stream (its content, refusals and tool calls), joined."""
        return "".join(self._parts) + "".join(stream_parts(b"".join(self._raw)))

    def usage(self, prompt_tokens: int, encoding: str) -> Usage:
        """The usage of a stream that carried none: its completion counted from its text."""
        return counted_usage(prompt_tokens, self._parts + stream_parts(b"".join(self._raw)), encoding)
