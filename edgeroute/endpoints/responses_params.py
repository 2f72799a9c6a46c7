"""The types of a Responses request's top-level parameters, checked before any upstream sees it.

A request with no chat translation is passed to a Responses upstream as written: a wrong type
(`"input": {...}`, `"tools": 5`) cost an upstream call per deployment tried and came back as
whatever that upstream said. It is a 400 here, in OpenAI's words (`invalid_type`, naming the
parameter). Only the shape is checked; the values are the upstream's to judge.
"""

from __future__ import annotations

from typing import Any

from edgeroute.errors import ProxyError

_STRING, _ARRAY, _OBJECT, _BOOLEAN = "a string", "an array", "an object", "a boolean"
_NUMBER, _INTEGER = "a number", "an integer"

# What each parameter may be (besides absent or null), as OpenAI's API reference gives it.
_EXPECTED: dict[str, tuple[str, ...]] = {
    "input": (_STRING, _ARRAY),
    "instructions": (_STRING,),
    "tools": (_ARRAY,),
    "tool_choice": (_STRING, _OBJECT),
    "include": (_ARRAY,),
    "metadata": (_OBJECT,),
    "text": (_OBJECT,),
    "reasoning": (_OBJECT,),
    "prompt": (_OBJECT,),
    "stream_options": (_OBJECT,),
    "conversation": (_STRING, _OBJECT),
    "previous_response_id": (_STRING,),
    "prompt_cache_key": (_STRING,),
    "safety_identifier": (_STRING,),
    "service_tier": (_STRING,),
    "truncation": (_STRING,),
    "user": (_STRING,),
    "parallel_tool_calls": (_BOOLEAN,),
    "store": (_BOOLEAN,),
    "temperature": (_NUMBER,),
    "top_p": (_NUMBER,),
    "max_tool_calls": (_INTEGER,),
    "top_logprobs": (_INTEGER,),
}


def _kind(value: Any) -> str:
    if isinstance(value, bool):  # before int: True is an int to Python, not to JSON
        return _BOOLEAN
    if isinstance(value, int):
        return _INTEGER
    if isinstance(value, float):
        return _NUMBER
    if isinstance(value, str):
        return _STRING
    return _ARRAY if isinstance(value, list) else _OBJECT


def check(req: dict[str, Any]) -> None:
    """Raises a 400 naming the first parameter whose type OpenAI's API would refuse."""
    for name, expected in _EXPECTED.items():
        value = req.get(name)
        if value is None:
            continue
        got = _kind(value)
        if got not in expected and not (got == _INTEGER and _NUMBER in expected):
            raise _invalid(name, f"expected {' or '.join(expected)}, but got {got} instead")
    include = req.get("include")
    if isinstance(include, list) and not all(isinstance(v, str) for v in include):
        raise _invalid("include", "expected an array of strings")


def _invalid(name: str, why: str) -> ProxyError:
    return ProxyError(400, f"Invalid type for '{name}': {why}.", code="invalid_type", param=name)
