"""Whose code execution container an id names: a container confined to the tenant it was made for.

A code execution tool (Anthropic's `code_execution_*`, a Responses `code_interpreter`) runs
in a container at the provider, in the account every tenant of the gateway shares; the
container keeps the files written in it, and a later request names it by id to go on with
them (Anthropic's `container`, a Responses code interpreter's `container`, a shell's
`environment`, or a call sent back as input, whose container a tool in auto mode goes on in).
So each container id an answer gives back is bound to who made the request (the same owner as a Responses id,
`owners.owner_of`), in the same table (`gov_response_owners`, under a `container:`
prefix: SQLite or PostgreSQL, shared by workers and instances, kept across restarts). A
request naming a container bound to someone else, or to no one, is answered the provider's
own 404 for an unknown container: whether it exists is not revealed.

A JSON answer's containers are bound before it is sent. A stream names its container as it
goes (Anthropic: in its last `message_delta`); its containers are bound after its last event
is written and before its end reaches the client, so a stream cut before then (the client
gone, the process killed) leaves its container unbound: refused later, never another
tenant's. Without virtual keys there is one tenant: nothing is bound or checked.

The files code execution writes in a container are named in the answer too (a `file_id` in
the content of Anthropic's `code_execution_tool_result` / `bash_code_execution_tool_result`
blocks, for the Files API): each is bound to the caller the same way, under
`provider_files.FILE_PREFIX`, so the tenant can send it back (`provider_files`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from edgeroute.dispatch import JsonAnswer, StreamAnswer
from edgeroute.errors import ProxyError
from edgeroute.owners import MAX_ID, bind_all, owner_of, stored_owner
from edgeroute.provider_files import FILE_PREFIX
from edgeroute.state import Live

PREFIX = "container:"  # in the response owners' table: no provider's response id starts so


def _not_found(container: str, param: str) -> ProxyError:
    return ProxyError(
        404, f"Container with id '{container[:MAX_ID]}' not found.", code="container_not_found", param=param
    )


async def check(request: web.Request, live: Live, container: str, param: str) -> None:
    """Refuses a container id the caller's tenant was not given (see the module's doc)."""
    if not live.access.keyed(request):
        return
    if not container or len(container) > MAX_ID:
        raise _not_found(container, param)
    if await stored_owner(request, PREFIX + container, "a container") != owner_of(request):
        raise _not_found(container, param)


async def bind(request: web.Request, live: Live, containers: Iterable[str], files: Iterable[str] = ()) -> None:
    """Binds each container id and output file (under `FILE_PREFIX`) to the caller, in one write
    (see `owners.bind_all`), with tenants only."""
    if live.access.keyed(request):
        await bind_all(request, {PREFIX: containers, FILE_PREFIX: files}, "a container or file id")


# Code execution's results, and the outputs in them that name a file it wrote.
_CODE_RESULTS = {
    "code_execution_tool_result": "code_execution_output",
    "bash_code_execution_tool_result": "bash_code_execution_output",
}


def output_files(block: Any) -> set[str]:
    """The files a content block of a Messages answer says code execution wrote: the `file_id` of
    each output in a code execution result (`content.content[*]`). Another tool's result says
    what its server likes (an MCP server is the caller's): a `file_id` in it is no file written."""
    kind = block.get("type") if isinstance(block, dict) else None
    output = _CODE_RESULTS.get(kind) if isinstance(kind, str) else None
    result = block.get("content") if output is not None else None
    items = result.get("content") if isinstance(result, dict) else None
    return {
        x["file_id"]
        for x in (items if isinstance(items, list) else ())
        if isinstance(x, dict) and x.get("type") == output and isinstance(x.get("file_id"), str)
    }


def answer_files(obj: dict[str, Any] | None) -> set[str]:
    """The output files a JSON Messages answer's object names."""
    content = obj.get("content") if obj is not None else None
    return {f for block in (content if isinstance(content, list) else ()) for f in output_files(block)}


def stream_files(got: StreamAnswer) -> set[str]:
    """The output files a relayed Messages stream named (its native translator saw them), once
    its last event was read: one cut before (the upstream gone, an error event) binds none."""
    seen = getattr(got.translator, "files", None)
    return set(seen) if isinstance(seen, set) and getattr(got.translator, "ended", False) is True else set()


def anthropic_container(obj: Any) -> str | None:
    """The container of a Messages answer (`container.id`) or of a stream's `message_delta`."""
    if not isinstance(obj, dict):
        return None
    found = obj.get("container")
    if found is None and isinstance(obj.get("delta"), dict):
        found = obj["delta"].get("container")
    cid = found.get("id") if isinstance(found, dict) else None
    return cid if isinstance(cid, str) else None


def item_container(item: Any) -> str | None:
    """The container a Responses item or tool names: a code interpreter call's `container_id`, a
    shell's `environment` (`{"type": "container_reference", "container_id": ...}`)."""
    if not isinstance(item, dict):
        return None
    env = item.get("environment")
    cid = item.get("container_id", env.get("container_id") if isinstance(env, dict) else None)
    return cid if isinstance(cid, str) else None


def responses_named(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """The containers a Responses request names by id, with where: a code interpreter tool's
    `container`, a shell tool's `environment`, and the items sent back as input (a tool in auto
    mode goes on in the container of a call in its context)."""
    found = []
    tools, items = raw.get("tools"), raw.get("input")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if isinstance(tool, dict) and isinstance(tool.get("container"), str):
            found.append((tool["container"], f"tools[{i}].container"))
        elif (cid := item_container(tool)) is not None:
            found.append((cid, f"tools[{i}].environment.container_id"))
    for i, item in enumerate(items if isinstance(items, list) else ()):
        if (cid := item_container(item)) is not None:
            where = "container_id" if isinstance(item.get("container_id"), str) else "environment.container_id"
            found.append((cid, f"input[{i}].{where}"))
    return found


def responses_containers(output: Any) -> set[str]:
    """The containers a Response's output items ran in (a code interpreter's `container_id`, a
    shell call's `environment`)."""
    return {cid for item in (output if isinstance(output, list) else ()) if (cid := item_container(item))}


def answer_containers(obj: dict[str, Any] | None) -> set[str]:
    """The containers a JSON answer's object of either API names."""
    if obj is None:
        return set()
    found = responses_containers(obj.get("output"))
    if (cid := anthropic_container(obj)) is not None:
        found.add(cid)
    return found


def json_answer(got: JsonAnswer) -> dict[str, Any] | None:
    """A JSON answer's object (None: not an object): the one its reader parsed, if it is of
    the body as it stands. Taken from `got`: the parsed object (several times an answer of up to
    128 MiB) is not held while the answer is bound and sent."""
    read, got.read = got.read, None
    if read is not None and read[0] is got.body:
        return read[1]
    try:
        obj = orjson.loads(got.body)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def stream_containers(got: StreamAnswer) -> set[str]:
    """The containers a relayed stream named (its native translator saw them)."""
    seen = getattr(got.translator, "containers", None)
    return set(seen) if isinstance(seen, set) else set()
