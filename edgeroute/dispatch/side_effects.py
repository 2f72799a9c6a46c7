"""Requests that act beyond their answer, which a second upstream would act again.

A Responses request with a tool its upstream runs itself against the world (an MCP server's
tools, a code interpreter's container), an Anthropic Messages request with an MCP server or the
code execution tool each act at the upstream that runs them: sent twice, the MCP server's "send
email" runs twice. `store: true` alone is not one: a stored copy is a record, not an action (a
retry keeps two, and the client gets the id of the one that answered), and failover is worth
more than a duplicate record. Such a request is never hedged, and once an upstream may have
run it (it was written to the connection and the answer was not a refusal at the door: a 4xx,
503, or 529) it is not sent to another deployment; a connection that failed before the request
was written still fails over. Read-only server tools (web search, file search, web fetch) and
tools the client runs (functions, computer use, shell) are not side effects.
"""

from __future__ import annotations

from typing import Any

from edgeroute.dispatch.attempt import Failure

# Responses tool types (by prefix) whose server-side run acts outside the answer.
_RESPONSES_TOOLS = ("mcp", "code_interpreter")
# Anthropic tool types (by prefix): code execution, in a container that keeps its files.
_ANTHROPIC_TOOLS = ("code_execution_",)
# Statuses an upstream answers before it runs anything: the request was refused, not run.
_REFUSED_AT_THE_DOOR = frozenset({503, 529})


def _tool(tools: Any, prefixes: tuple[str, ...]) -> str | None:
    """The first of `tools` whose type starts with one of `prefixes`, as `tools[i]` of its type."""
    for i, t in enumerate(tools if isinstance(tools, list) else ()):
        kind = t.get("type") if isinstance(t, dict) else None
        if isinstance(kind, str) and kind.startswith(prefixes):
            return f"`tools[{i}]` of type `{kind}`"
    return None


def responses(req: dict[str, Any]) -> str | None:
    """What of a Responses request acts upstream (a server-run tool), or None."""
    return _tool(req.get("tools"), _RESPONSES_TOOLS)


def messages(req: dict[str, Any]) -> str | None:
    """What of an Anthropic Messages request acts upstream (MCP servers, code execution), or None."""
    if req.get("mcp_servers"):
        return "`mcp_servers`"
    return _tool(req.get("tools"), _ANTHROPIC_TOOLS)


def may_have_run(f: Failure) -> bool:
    """Whether the upstream of failed attempt `f` may have run the request: it was written to
    the connection, and the answer (if any) was not a refusal before any work (a 4xx, 503, 529)."""
    if not f.sent or not f.reached:
        return False
    return f.status is None or not (400 <= f.status < 500 or f.status in _REFUSED_AT_THE_DOOR)


def why_not_again(what: str) -> str:
    """The words a client reads for a request not sent a second time, `what` its side effect."""
    return (
        f"It was not retried on another deployment: the request has side effects upstream ({what}),"
        " which a second run would repeat."
    )
