"""A chat request's Predicted Output (`prediction`), whose tokens budgets reserve at the output price.

OpenAI bills the prediction's tokens an answer does not use (`completion_tokens_details.
rejected_prediction_tokens`) as completion tokens, on top of what `max_tokens` bounds: a
reservation of `max_tokens` alone let a request with a long prediction spend past a budget.
A request reserves its prediction's tokens for each answer, as it does `max_tokens`; what
settles is the answer's `completion_tokens`, which counts the rejected ones.

The core's parse of the body finds the member (`Decision.prediction`, as written; a key spelt
`predict\\u0069on`, which the upstream reads as `prediction`, too): only it is read again here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from edgeroute import _core
from edgeroute.errors import ProxyError, checked_json

_ON_LOOP_CHARS = 16 * 1024  # a longer prediction is read and counted in a worker thread


def texts(raw: str) -> list[str]:
    """The texts of a `prediction` written as `raw` (JSON); a 400 in OpenAI's words for one of
    a shape OpenAI refuses (a lenient server would take and bill it)."""
    value = checked_json(raw)  # the core kept it unread: `1e400` within is not orjson's
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


def _count(raw: str, encoding: str) -> int:
    # Each part on its own: a join may merge tokens across parts.
    return sum(_core.Router.count_tokens(t, encoding) for t in texts(raw) if t)


async def tokens(decision: _core.Decision) -> int:
    """The tokens of the decided request's prediction under its encoding (0: it has none),
    a long one off the loop; raises the 400 of `texts`."""
    raw = decision.prediction
    if raw is None:
        return 0
    if len(raw) > _ON_LOOP_CHARS:
        return await asyncio.to_thread(_count, raw, decision.encoding)
    return _count(raw, decision.encoding)


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
