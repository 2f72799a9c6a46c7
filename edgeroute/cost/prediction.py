"""A chat request's Predicted Output (`prediction`), whose tokens budgets reserve at the output price.

OpenAI bills the prediction's tokens an answer does not use (`completion_tokens_details.
rejected_prediction_tokens`) as completion tokens, on top of what `max_tokens` bounds: a
reservation of `max_tokens` alone let a request with a long prediction spend past a budget.
A request reserves its prediction's tokens for each answer, as it does `max_tokens`; what
settles is the answer's `completion_tokens`, which counts the rejected ones.

The body is parsed again only when it may hold the member: its name appears, or a `\\u`
escape (a key may spell it `predict\\u0069on`, which the upstream reads as `prediction`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from edgeroute import _core
from edgeroute.errors import ProxyError

_ON_LOOP_BYTES = 256 * 1024  # a larger body is parsed again in a worker thread
_ON_LOOP_CHARS = 16 * 1024  # a longer prediction is counted in a worker thread


def may_have(body: bytes) -> bool:
    return b"prediction" in body or b"\\u" in body


def texts(body: bytes) -> list[str]:
    """The texts of a chat body's `prediction` (none when it has none); a 400 in OpenAI's
    words for one of a shape OpenAI refuses (a lenient server would take and bill it)."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []  # the core refused it already
    value = req.get("prediction") if isinstance(req, dict) else None
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _invalid_type("prediction", "an object", value)
    kind = value.get("type")
    if kind is None:
        raise _missing("prediction.type")
    if kind != "content":
        raise ProxyError(
            400,
            f"Invalid value: {_quoted(kind)}. Supported values are: 'content'.",
            code="invalid_value",
            param="prediction.type",
        )
    content = value.get("content")
    if content is None:
        raise _missing("prediction.content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _invalid_type("prediction.content", "one of a string or array of objects", content)
    out: list[str] = []
    for i, part in enumerate(content):
        where = f"prediction.content[{i}]"
        if not isinstance(part, dict):
            raise _invalid_type(where, "an object", part)
        if part.get("type") != "text":
            raise ProxyError(
                400,
                f"Invalid value: {_quoted(part.get('type'))}. Supported values are: 'text'.",
                code="invalid_value",
                param=f"{where}.type",
            )
        text = part.get("text")
        if text is None:
            raise _missing(f"{where}.text")
        if not isinstance(text, str):
            raise _invalid_type(f"{where}.text", "a string", text)
        out.append(text)
    return out


async def tokens(body: bytes, encoding: str) -> int:
    """The tokens of a chat body's prediction under `encoding` (0: it has none), each part
    counted on its own (a join may merge tokens across parts); large ones off the loop."""
    if not may_have(body):
        return 0
    parts = await asyncio.to_thread(texts, body) if len(body) > _ON_LOOP_BYTES else texts(body)
    if not parts:
        return 0

    def count() -> int:
        return sum(_core.Router.count_tokens(t, encoding) for t in parts if t)

    return await asyncio.to_thread(count) if sum(map(len, parts)) > _ON_LOOP_CHARS else count()


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _quoted(value: Any) -> str:
    said = f"'{value}'" if isinstance(value, str) else orjson.dumps(value).decode()
    return said if len(said) <= 80 else said[:77] + "..."  # a client's value, not echoed whole


def _invalid_type(param: str, expected: str, got: Any) -> ProxyError:
    message = f"Invalid type for '{param}': expected {expected}, but got {_kind(got)} instead."
    return ProxyError(400, message, code="invalid_type", param=param)


def _missing(param: str) -> ProxyError:
    return ProxyError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
