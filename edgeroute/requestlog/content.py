"""What the request log keeps of a prompt and its answer: nothing by default.

`log_content: full` keeps the request body and the answer (a stream's text once it has
completed), cut at `max_content_bytes`, with credentials (configured secrets, key and token
shapes) replaced by the redaction layer's marker: no token or provider key is ever stored.
`redacted` also replaces PII (the core's detectors: e-mail, phone, payment card, IBAN,
national id) with typed markers such as `[PII:email]`. The request path only hands the bytes
over (`RequestRecord.content_*`); decoding, cutting and redaction run in the writer thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from edgeroute import _core, redact
from edgeroute.accounting import RequestRecord, stream_text


def keep_stream(rec: RequestRecord, then: Callable[[bytes], None] | None) -> Callable[[bytes], None] | None:
    """A stream's completion callback that also hands the answer to the request log, where
    `rec` keeps content (else `then` as it was)."""
    if rec.content_mode == "none":
        return then

    def keep(sse: bytes) -> None:
        rec.content_response = sse
        if then is not None:
            then(sse)

    return keep


def _text(raw: bytes | None, max_bytes: int) -> tuple[str | None, bool]:
    if raw is None:
        return None, False
    if raw.startswith(b"data:") or b"\ndata:" in raw[:512]:
        raw = stream_text(raw).encode()
    cut = len(raw) > max_bytes
    return raw[:max_bytes].decode("utf-8", "ignore"), cut


def stored(rec: RequestRecord, max_bytes: int) -> dict[str, Any] | None:
    """The content to store for `rec`, or None (the default: nothing)."""
    mode = rec.content_mode
    if mode not in ("full", "redacted"):
        return None
    out: dict[str, Any] = {"mode": mode, "truncated": False}
    for name, raw in (("request", rec.content_request), ("response", rec.content_response)):
        text, cut = _text(raw, max_bytes)
        if text is not None:
            text = redact.text(text)
            if mode == "redacted":
                text = _core.redact_pii(text)
        out[name] = text
        out["truncated"] |= cut
    return out


# A quoted literal in an upstream's error message: a quote not inside a word ("model's" is not
# one), up to the same quote not followed by a word character.
_QUOTED = re.compile("(?<!\\w)(['\"`\u2018\u201c])(.*?)(?:\\1|[\u2019\u201d])(?!\\w)", re.DOTALL)


def _elide(m: re.Match[str]) -> str:
    inner = m.group(2)
    if len(inner) <= 40 and not any(c.isspace() for c in inner):
        return m.group(0)  # a parameter's name or a short value ('messages[0].content', "foo")
    return m.group(1) + "[elided]" + m.group(0)[-1]


def error_text(text: str, mode: str) -> str:
    """An attempt's error as the request log stores it for a request kept at `mode`: an upstream's
    error may quote the request (a validation error's `input`, a filter naming what it matched).
    Credentials are always replaced; `redacted` also masks PII; `none`, where no prompt may be
    stored, also elides quoted text with spaces or longer than 40 characters (a parameter's
    name stays)."""
    text = redact.text(redact.cut(text, 500))
    if mode == "full":
        return text
    if mode == "none":
        text = _QUOTED.sub(_elide, text)
    return _core.redact_pii(text)
