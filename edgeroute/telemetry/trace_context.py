"""W3C trace context for one request: parsed from the client, passed on to upstreams.

A leaf module (the request records hold a `TraceContext`). Made only when tracing is
on, and then cheaply: an id or two from `random.getrandbits` and a header string. The
spans themselves are built after the request, from its records (`tracing`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str | None) -> tuple[str, int, bool] | None:
    """(trace id in hex, parent span id, sampled) from a `traceparent` header; None when malformed."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace, span, flags = parts[:4]
    if len(trace) != 32 or len(span) != 16 or len(flags) != 2 or not set(version + trace + span + flags) <= _HEX:
        return None
    span_id = int(span, 16)
    if span_id == 0 or trace == "0" * 32:
        return None
    return trace, span_id, bool(int(flags, 16) & 1)


def new_span_id() -> int:
    return random.getrandbits(64) or 1


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


@dataclass(slots=True)
class TraceContext:
    trace_id: str  # 32 hex digits (a 128-bit int would not fit the records' JSON)
    span_id: int  # the request's span (0 when not sampled)
    parent_span_id: int  # the client's span, 0 without one
    sampled: bool
    client_header: str | None = None  # forwarded unchanged when we do not sample
    tracestate: str | None = None

    def inject(self, headers: dict[str, str]) -> int:
        """Adds `traceparent` (and `tracestate`) for an upstream attempt; returns the attempt's span id."""
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        if not self.sampled:
            if self.client_header is not None:
                headers["traceparent"] = self.client_header
            return 0
        span_id = new_span_id()
        headers["traceparent"] = f"00-{self.trace_id}-{span_id:016x}-01"
        return span_id

    def response_header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id:016x}-{'01' if self.sampled else '00'}"
