"""The structured fields of a provider's error body, which adapters classify it by.

Upstreams quote the client's input in their 400s ("Unrecognized request argument supplied: X",
pydantic's `input`), so a phrase found anywhere in the body is the client's to choose: a field
named "incorrect api key" made a client's own 400 our refused key (fail over, 502, circuits
opened for everyone). Codes, types, RPC statuses and reasons are the provider's alone; a phrase
is read only where a provider gives no code, and only at the start of its message (its own
words: a client's text is quoted after them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# How much of a message a start-anchored phrase is looked for in.
_MESSAGE_CHARS = 200


@dataclass(frozen=True, slots=True)
class ErrorFields:
    code: str = ""  # OpenAI's `error.code` ("invalid_api_key"); vLLM's numeric code as text
    type: str = ""  # `error.type` (OpenAI, Anthropic), AWS's `__type` (after its `#`)
    status: str = ""  # Google's RPC status ("INVALID_ARGUMENT")
    reasons: tuple[str, ...] = ()  # Google's `error.details[].reason` ("API_KEY_INVALID")
    message: str = ""  # the start of `error.message`, lower case

    def says(self, *openings: str) -> bool:
        """Whether the message begins with one of `openings` (lower case)."""
        return self.message.startswith(openings)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value) if type(value) is int else ""


def read(body: bytes) -> ErrorFields:
    """The fields of an error body (OpenAI's and Google's `{"error": {...}}`, Anthropic's
    `{"type": "error", "error": {...}}`, vLLM's and AWS's flat objects); empty ones when the
    body is not JSON."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ErrorFields()
    if isinstance(obj, list) and obj:  # Google answers some errors as a one-element list
        obj = obj[0]
    if not isinstance(obj, dict):
        return ErrorFields()
    err = obj.get("error")
    if isinstance(err, str):
        err = {"message": err}
    elif not isinstance(err, dict):
        err = obj
    details = err.get("details")
    reasons = (
        tuple(d["reason"] for d in details if isinstance(d, dict) and isinstance(d.get("reason"), str))
        if isinstance(details, list)
        else ()
    )
    message = err.get("message", err.get("Message"))
    etype = _text(err.get("type")) or _text(obj.get("__type")).rpartition("#")[2]
    return ErrorFields(
        code=_text(err.get("code")),
        type=etype,
        status=_text(err.get("status")),
        reasons=reasons,
        message=message[:_MESSAGE_CHARS].lstrip().lower() if isinstance(message, str) else "",
    )
