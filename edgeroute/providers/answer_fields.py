"""A native provider's answer fields (Gemini's, Bedrock's) read as their protocol types them.

A careless upstream's value of another type (`candidates` a string, a part that is not an
object, `contentBlockIndex` a list) raised whatever the first use of it raised (an
AttributeError, a TypeError, a KeyError): a traceback in the log for each attempt, however
often the upstream sent it. Here it is the upstream's protocol error (`Unreadable`, a
`sse.StreamProtocolError`): a JSON answer or a stream before content fails over, a stream
after content ends with an error event in the client's format (`upstream_protocol_error`),
and the deployment's health is charged, as for an OpenAI upstream's unreadable event. A
missing field is read as absent (None: the empty value), as before.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeroute import sse

log = logging.getLogger("edgeroute.dispatch")

_NONE: dict[str, Any] = {}  # a missing object: read, never written


class Unreadable(sse.StreamProtocolError):
    """A field of an answer whose type its protocol does not allow. Its text follows
    "The upstream ..." ("sent a Gemini answer whose `candidates` is not a list")."""


def fail(what: str, field: str, kind: str) -> Unreadable:
    return Unreadable(f"sent {what} whose `{field}` is not {kind}")


def obj(value: Any, what: str, field: str) -> dict[str, Any]:
    """An object field (None: an empty one)."""
    if type(value) is dict:
        return value
    if value is None:
        return _NONE
    raise fail(what, field, "an object")


def objects(value: Any, what: str, field: str) -> list[dict[str, Any]]:
    """A list of objects (None: an empty one)."""
    if value is None:
        return []
    if type(value) is list and all(type(v) is dict for v in value):
        return value
    raise fail(what, field, "a list of objects")


def text(value: Any, what: str, field: str) -> str:
    """A text field (None: empty; a number or an object is no text, never its `str()`)."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    raise fail(what, field, "a string")


def maybe_text(value: Any, what: str, field: str) -> str | None:
    """A text field whose absence means something (a finish reason not given yet)."""
    return None if value is None else text(value, what, field)


def index(value: Any, what: str, field: str) -> int:
    """A block's index (None: 0)."""
    if value is None:
        return 0
    if type(value) is int and value >= 0:
        return value
    raise fail(what, field, "an index")


def said(provider: str, e: Unreadable) -> Unreadable:
    """Logs `e` in one line (no traceback: the upstream's shape, not a bug of ours) and returns it."""
    log.warning("an upstream of %s %s: the attempt failed", provider, e)
    return e
