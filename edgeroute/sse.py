"""Small helpers for OpenAI-style server-sent events."""

from __future__ import annotations

from typing import Any

import orjson

from edgeroute import redact

DONE = b"data: [DONE]"


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Splits complete events (separated by a blank line) off `buf`; returns (events, rest)."""
    buf = buf.replace(b"\r\n", b"\n")
    *events, rest = buf.split(b"\n\n")
    return [e for e in events if e.strip()], rest


def event_data(event: bytes) -> bytes | None:
    """The concatenated `data:` payload of one event, or None if it has none."""
    parts = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None


def error_event(message: str, code: str, etype: str = "upstream_error") -> bytes:
    """An in-stream error in the shape the OpenAI SDKs raise on (its message redacted)."""
    body: dict[str, Any] = {"error": {"message": redact.message(message), "type": etype, "param": None, "code": code}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def redact_errors(chunk: bytes) -> bytes:
    """A relayed stream chunk with the credentials an upstream's error event may quote redacted.

    Only chunks that carry an `"error"` key are decoded (a model's text cannot: its quotes
    are escaped inside a JSON string), so a stream's content pays one substring search."""
    if b'"error"' not in chunk:
        return chunk
    return redact.text(chunk.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def find_usage(tail: bytes) -> dict[str, Any] | None:
    """The last non-null `usage` object among the complete events in `tail`."""
    idx = tail.rfind(b'"usage":{')
    if idx < 0:
        return None
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
