"""Files and vector stores kept at a provider, named by id: no tenant's, so refused with tenants.

A request can name what the provider account behind a deployment stores: a file (chat's
`{"type": "file", "file": {"file_id": …}}`, a Responses `input_file` / `input_image`, an
Anthropic `document` or `image` whose source is `{"type": "file"}`, a `container_upload`, a
code interpreter container's `file_ids`, a stored prompt's `variables`), a vector store (a
`file_search` tool's `vector_store_ids`) or an Anthropic container's custom skill (`skill_id`).
That account is shared by every tenant of the gateway, and edgeroute relays no upload
(`/v1/files`, `/v1/skills`): no such id was given to a tenant through it, so none can be
confined to one. A tenant holding another's id (from a log, a shared transcript) had the
model read that file. With tenants (virtual keys) such a request is a 400 naming where, before
any call, unless the operator says the account's files are for everyone
(`server.provider_files: shared`). Without virtual keys there is one tenant: nothing is checked.

The files an answer gives a tenant are the exception: Anthropic's code execution writes output
files and names them (`file_id`s in its `*_tool_result` blocks), which the tenant sends back
(its conversation's history, a `container_upload`, a document). Each such id is bound to the
caller (`container_owners`, under `FILE_PREFIX` in the response owners' table) and a `file_id`
bound to the caller passes; one bound to someone else (or to two owners) is refused as one no
answer gave, so that the answer tells nobody whether an id is a tenant's.

Only the shapes above are read, and every field of a tool but those that hold the
application's own (a tool's schema, a tool call's arguments or `metadata` may hold a `file_id`
of the application's own): an image generation tool's `input_image_mask` names a file too. A
body without any of these keys' names, and without a backslash-u escape that could spell one,
is not parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from edgeroute.errors import ProxyError, checked_json
from edgeroute.owners import MAX_ID, owner_of, stored_owner

_MARKERS = (b"file_id", b"vector_store_ids", b"skill_id")  # the first finds `file_ids` too
_NAMES = ("file_id", "file_ids", "vector_store_ids")
# Where such an id can sit: content lists and parts, and the tools that carry them. A dict
# under another key (a tool's `parameters` or `input_schema`, a tool call's `input`,
# `metadata`) is the application's own.
_INTO = frozenset(
    {
        "messages",
        "input",
        "content",
        "output",
        "source",
        "file",
        "tools",
        "container",
        "prompt",
        "skills",
        "input_image_mask",  # the image generation tool's mask: `{"file_id": ...}`
    }
)
# A tool's fields are read whole (the next built-in tool's field that names a file is caught by
# default), except those that hold the application's own: a function's schema, a custom tool's
# grammar, an MCP server's headers.
_TOOL_OWN = frozenset({"parameters", "input_schema", "function", "custom", "format", "headers", "metadata"})
_OWN_SKILLS = "anthropic"  # a `container.skills` entry of this type is the provider's own (`xlsx`, `pdf`)
THREAD_FROM_BYTES = 1 << 20  # a body this large is searched and parsed in a worker thread
FILE_PREFIX = "file:"  # an output file's binding in the response owners' table


def _named(value: Any, path: str) -> Iterator[tuple[str, str | None]]:
    """The path of each provider file, vector store or skill `value` names, with the file's id
    when it is one `file_id` (else None)."""
    if isinstance(value, list):
        for i, v in enumerate(value):
            yield from _named(v, f"{path}[{i}]")
        return
    if not isinstance(value, dict):
        return
    for name in _NAMES:
        got = value.get(name)
        if (name == "file_id" and isinstance(got, str) and got) or (isinstance(got, list) and got):
            yield f"{path}.{name}" if path else name, got if isinstance(got, str) else None
    # An Anthropic container's custom skill (`{"type": "custom", "skill_id": ...}`) is code and
    # files uploaded to the account (`/v1/skills`), as a file is.
    if path.endswith("]") and ".skills[" in path and value.get("type") != _OWN_SKILLS:
        if isinstance(value.get("skill_id"), str) and value["skill_id"]:
            yield f"{path}.skill_id", None
    tool = path.endswith("]") and path.rpartition("[")[0].endswith("tools")
    for key, v in value.items():
        if tool and key not in _INTO and key not in _TOOL_OWN and isinstance(v, (dict, list)):
            yield from _named(v, f"{path}.{key}")
        # A top-level `input` is a list (Responses); a tool call's `input` is its arguments.
        if key in _INTO and (isinstance(v, list) or (isinstance(v, dict) and key != "input")):
            yield from _named(v, f"{path}.{key}" if path else key)
        # A stored prompt's variables (Responses `prompt.variables`) are input parts by name.
        if key == "variables" and path == "prompt" and isinstance(v, dict):
            for name, part in v.items():
                yield from _named(part, f"prompt.variables.{name}")


def named(body: bytes) -> list[tuple[str, str | None]]:
    """What a request body names at the provider (see `_named`), in its order."""
    # A key's name may be spelt with escapes (`"file\u005fid"`): such a body is always parsed.
    if b"\\u" not in body and not any(m in body for m in _MARKERS):
        return []
    return list(_named(checked_json(body), ""))  # one the core took may not parse here: refused


def refused(found: str) -> ProxyError:
    """The 400 for what names a file, vector store or skill of the provider's, at `found`."""
    if found.endswith(".skill_id"):
        what, instead = "a custom skill", "use Anthropic's own skills"
    else:
        what, instead = "a file or vector store", "send the file's content instead (file_data, base64)"
    return ProxyError(
        400,
        f"'{found}' names {what} kept at the provider, which edgeroute cannot confine to this key's tenant: "
        f"{instead}, or ask the operator to allow provider files (server.provider_files: shared).",
        param=found,
        code="provider_file_refused",
    )


async def refuse_named(body: bytes, request: web.Request) -> None:
    """Refuses a request that names a provider's file, vector store or skill, unless it is a
    file an answer gave the caller (see the module's doc); the body read off the loop when large."""
    found = await asyncio.to_thread(named, body) if len(body) >= THREAD_FROM_BYTES else named(body)
    caller = owner_of(request) if found else ""
    mine: set[str] = set()  # looked up once however often a history names it
    for where, file_id in found:
        if file_id is None or len(file_id) > MAX_ID:
            raise refused(where)
        if file_id in mine:
            continue
        owner = await stored_owner(request, FILE_PREFIX + file_id, "a file_id")
        mine.add(file_id)
        # Another's is refused as one no answer gave: a different answer would tell the
        # holder of an id that some tenant owns it.
        if owner != caller:
            raise refused(where)
