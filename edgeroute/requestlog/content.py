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


# A request refused and not paid for (a 4xx or 5xx at $0: an unknown model, a limit, an
# upstream's refusal) keeps at most this much of its prompt and answer: a key sending large
# prompts to be refused stored ~64 KB a request for nothing, and the size cap's oldest-first
# eviction then dropped every team's history.
REFUSED_CONTENT_BYTES = 2048


def _masked(text: str, pii: bool) -> str:
    """`text` with credentials (and PII where `pii`) replaced as it reads (`redact.text`: JSON
    strings decoded, so `"card:\\n4111…"` or `\\u00a0` separators hide nothing)."""
    return redact.text(text, _core.redact_pii if pii else None)


def stored(rec: RequestRecord, max_bytes: int) -> dict[str, Any] | None:
    """The content to store for `rec`, or None (the default: nothing)."""
    mode = rec.content_mode
    if mode not in ("full", "redacted"):
        return None
    if rec.status >= 400 and not rec.cost_usd:
        max_bytes = min(max_bytes, REFUSED_CONTENT_BYTES)
    out: dict[str, Any] = {"mode": mode, "truncated": False}
    for name, raw in (("request", rec.content_request), ("response", rec.content_response)):
        text, cut = _text(raw, max_bytes)
        if text is not None:
            text = _masked(text, mode == "redacted")
        out[name] = text
        out["truncated"] |= cut
    return out


# A quoted literal: a quote not inside a word ("model's" is not one), up to the same quote (or
# its closing form) not followed by a word character; guillemets too. A JSON-escaped quote
# (`\\"`) is read as a quote first, so an escaped one inside cannot end the literal early.
_QUOTED = re.compile(
    "(?<!\\w)(['\"`\u2018\u201c\u201e\u00ab\u2039])(.*?)(?:\\1|[\u2019\u201d\u00bb\u203a])(?!\\w)", re.DOTALL
)
_ESCAPED_QUOTE = re.compile(r"\\+([\"'])")

# An upstream's free text may carry the prompt however it is written (quoted or not, spaced or
# not): with content off, only edgeroute's own messages are kept, and where they embed what the
# upstream said (after these openings) that part is withheld. The templates are those of
# `dispatch.attempt` and the endpoints (`Failure(...)`); a message of a new shape is withheld
# until it is added here (withheld, never leaked).
_WITHHELD = "[the upstream's message, not kept with content off]"
_OWN_MESSAGES = (
    r"upstream answered HTTP \d{3}",
    r"the upstream's (error answer \(HTTP \d{3}\) is|answers? (is|are)) larger than \d+ MiB",
    r"The provider refused edgeroute's credentials for this deployment \(HTTP \d{3}\)\.",
    r"the upstream answered with a redirect \(HTTP \d{3}\), which edgeroute does not follow;"
    r" check the provider's base_url",
    r"upstream sent (malformed JSON|an unexpected JSON value|a malformed stream event|embeddings without values)",
    r"upstream answer (could not be read \(\w+\)|has no \w+|has \w+ that are not objects"
    r"|has choices that are not objects with a message object)",
    r"upstream answered a different number of embeddings",
    r"the upstream answered a stream request with a whole JSON answer",
    r"upstream stream ended before any content",
    r"the upstream stalled while sending its answer|no answer within the timeout",
    r"TLS handshake failed: [\w .:,()-]{0,200}",
    r"connection failed: \w+",
    r"the upstream sent (a response head larger than \d+ KiB|a stream event that is not JSON in UTF-8"
    r"|a stream event that is not a JSON object"
    r"|a stream event whose choices are not objects with a delta object"
    r"|a stream event of another API, not a chat chunk"
    r"|a chat chunk in a completions stream"
    r"|a stream (error event|event) still unfinished past \d+ MiB)",
)
_OWN = re.compile("|".join(_OWN_MESSAGES))
_EMBEDS_UPSTREAM = ("upstream answered 200 without an answer: ", "upstream stream error: ")
# Edgeroute's refusals of a request a deployment cannot read (the `skipped` list, a hedge that
# cannot take it): written before any call, so no upstream's text; a part the client named in
# them is quoted, and elided as quoted text is.
_REFUSAL = re.compile(
    r"(The deployment `[^`\n]{1,200}` cannot read |Content parts of type `[^`\n]{1,80}` are not supported"
    r"|No AWS credentials are configured for provider )"
)


def _elide(m: re.Match[str]) -> str:
    inner = m.group(2)
    if len(inner) <= 40 and not any(c.isspace() for c in inner):
        return m.group(0)  # a parameter's name or a short value ('messages[0].content', "foo")
    return m.group(1) + "[elided]" + m.group(0)[-1]


def _without_content(text: str) -> str:
    """An error as kept with content off: edgeroute's own message, never an upstream's words."""
    if _OWN.fullmatch(text):
        return text
    for opening in _EMBEDS_UPSTREAM:
        if text.startswith(opening):
            return opening + _WITHHELD
    if _REFUSAL.match(text):
        return _QUOTED.sub(_elide, _ESCAPED_QUOTE.sub(r"\1", text))
    return _WITHHELD


def error_text(text: str, mode: str) -> str:
    """An attempt's error as the request log stores it for a request kept at `mode`: an upstream's
    error may quote the request (a validation error's `input`, a filter naming what it matched,
    or the prompt unquoted). Credentials are always replaced; `redacted` also masks PII; `none`,
    where no prompt may be stored (and for a key that may not read content), keeps only
    edgeroute's own messages (`_without_content`): the attempt's status and outcome say the rest."""
    text = redact.text(redact.cut(text, 500))
    if mode == "full":
        return text
    if mode == "none":
        text = _without_content(text)
    return _masked(text, True)
