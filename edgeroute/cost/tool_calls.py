"""The built-in tools a request enables, which budgets reserve one call of each for.

An upstream that runs a tool itself (OpenAI's Responses `web_search`, `file_search`,
`code_interpreter`; Anthropic's `web_search_2025...` and `web_fetch_2025...` server tools) bills
each call apart from tokens (`price.tool_calls`). How many calls a model makes is its choice,
so a reservation holds one of each tool enabled, at the highest price of the deployments the
request may reach; the calls the answer reports are what is settled.
"""

from __future__ import annotations

from typing import Any

from edgeroute.cost.media import Media, with_parts

# Responses tool types, by prefix (`web_search_preview`, `web_search_2025_08_26`), to priced kinds.
_RESPONSES = (("web_search", "web_search"), ("file_search", "file_search"), ("code_interpreter", "code_interpreter"))
_ANTHROPIC = (("web_search_", "web_search"), ("web_fetch_", "web_fetch"))


def _kinds(tools: Any, prefixes: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    found: list[str] = []
    for t in tools if isinstance(tools, list) else ():
        kind = t.get("type") if isinstance(t, dict) else None
        for prefix, priced in prefixes:
            if isinstance(kind, str) and kind.startswith(prefix) and priced not in found:
                found.append(priced)
    return tuple(found)


def responses_tools(tools: Any) -> tuple[str, ...]:
    """The priced built-in tools of a Responses request's `tools`."""
    return _kinds(tools, _RESPONSES)


def anthropic_tools(tools: Any) -> tuple[str, ...]:
    """The priced server tools of an Anthropic Messages request's `tools`."""
    return _kinds(tools, _ANTHROPIC)


def with_tools(media: Media | None, tools: tuple[str, ...]) -> Media | None:
    """`media` (a request's parts, reserved for) with the built-in tools it enables."""
    return with_parts(media, tools=tools)
