"""W3C trace context for one request: parsed from the client, passed on to upstreams.

A leaf module (the request records hold a `TraceContext`). Made only when tracing is
on, and then cheaply: an id or two from `random.getrandbits` and a header string. The
spans themselves are built after the request, from its records (`tracing`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")
# A tracestate list member (W3C trace context): `key=value`, ASCII, value without `,` or `=`.
_MEMBER = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


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


def valid_tracestate(value: str | None) -> str | None:
    """`value` when it is a well-formed tracestate (at most 512 characters, 32 members), else
    None: it goes to every upstream, so it is the client's text only in the form W3C allows."""
    if not value or len(value) > 512:
        return None
    members = [m.strip(" \t") for m in value.split(",")]
    present = [m for m in members if m]
    if not present or len(present) > 32 or not all(_MEMBER.fullmatch(m) for m in present):
        return None
    return value


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
    client_header: str | None = None  # the client's context as version 00, forwarded when we do not sample
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
