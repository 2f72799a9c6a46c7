"""The built-in tools a request enables, and how many calls of each budgets reserve for.

An upstream that runs a tool itself (OpenAI's Responses `web_search`, `file_search`,
`code_interpreter`, `image_generation`; Anthropic's `web_search_2025...` and `web_fetch_2025...`
server tools) bills each call apart from tokens (`price.tool_calls`). A reservation holds, at
the highest price of the deployments the request may reach, the calls the request allows: an
Anthropic tool's `max_uses`, a Responses request's `max_tool_calls` (of each tool it enables:
the bound is on all of them, and any may be the dearest), else `budgets.reserve_tool_calls` of
each (one by default: how many calls a model makes unbounded is its own choice). The calls the answer
reports are what is settled.
"""

from __future__ import annotations

from typing import Any

from edgeroute.cost.media import Media, with_parts

# Responses tool types, by prefix (`web_search_preview`, `web_search_2025_08_26`), to priced kinds.
_RESPONSES = (
    ("web_search", "web_search"),
    ("file_search", "file_search"),
    ("code_interpreter", "code_interpreter"),
    ("image_generation", "image_generation"),
)
_ANTHROPIC = (("web_search_", "web_search"), ("web_fetch_", "web_fetch"))

# A tool's priced kind, the calls its bounds allow, and how many of its tools have none (each
# reserved for `budgets.reserve_tool_calls`, which admission knows).
Tools = tuple[tuple[str, int, int], ...]


def _bound(value: Any) -> int | None:
    """The calls a client's bound allows: a positive integer as written, else none (an upstream
    refuses any other value)."""
    return value if type(value) is int and value >= 1 else None


def _kinds(tools: Any, prefixes: tuple[tuple[str, str], ...], bound: Any = None) -> Tools:
    """Each priced kind among `tools` with its calls: `bound` (a request's, on each kind), else
    the sum of its tools' `max_uses` (each tool is bounded on its own), and its tools without one."""
    found: dict[str, tuple[int, int]] = {}
    for t in tools if isinstance(tools, list) else ():
        kind = t.get("type") if isinstance(t, dict) else None
        if not isinstance(t, dict) or not isinstance(kind, str):
            continue
        for prefix, priced in prefixes:
            if kind.startswith(prefix):
                if bound is not None:
                    calls = _bound(bound)
                    found[priced] = (calls, 0) if calls is not None else (0, 1)
                else:
                    calls, unbounded = found.get(priced, (0, 0))
                    each = _bound(t.get("max_uses"))
                    found[priced] = (calls + each, unbounded) if each is not None else (calls, unbounded + 1)
    return tuple((kind, calls, unbounded) for kind, (calls, unbounded) in found.items())


def responses_tools(tools: Any, max_tool_calls: Any = None) -> Tools:
    """The priced built-in tools of a Responses request's `tools`, each reserved for its
    `max_tool_calls` (`reserve_tool_calls` when it sets none)."""
    return _kinds(tools, _RESPONSES, max_tool_calls)


def anthropic_tools(tools: Any) -> Tools:
    """The priced server tools of an Anthropic Messages request's `tools`, each reserved for
    its `max_uses` (`reserve_tool_calls` when it sets none)."""
    return _kinds(tools, _ANTHROPIC)


def with_tools(media: Media | None, tools: Tools) -> Media | None:
    """`media` (a request's parts, reserved for) with the built-in tools it enables."""
    return with_parts(media, tools=tools)
