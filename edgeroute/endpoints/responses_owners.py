"""Whose conversation a Responses id is: `previous_response_id` confined to its creator.

A deployment that speaks Responses keeps each response (`store`, on by default) in a
provider account every tenant of the gateway shares, and continues any of them from its id.
So each id the gateway returns is bound to who created it (the key's team, or the key when
it has none; callers of a shared `server.api_keys` key are one owner) in the governance
tables of the ledger's database (`gov_response_owners`: SQLite or PostgreSQL, so the binding
survives a restart and is the same for every worker and instance sharing the ledger). The
binding is written before the answer (or the stream's first event, which carries the id)
reaches the client: a process killed in between never showed the id, and a write that
fails leaves the id unbound. A request whose `previous_response_id` is bound to someone
else, or to no one (made before this check existed, directly at the provider, or whose
binding failed), is answered OpenAI's own 404 for an unknown id: whether it exists is not
revealed. Stored state named by id that no binding covers (an input `item_reference`, an
output item sent back as its id alone, a reasoning item without its encrypted content, a
provider-side `conversation`) is refused with a 400 before any call. Each binding keeps the
conversation's size (its input and output tokens as billed), which a continuation's prompt
counts so that budgets and token limits reserve for what the provider reads again; a code
interpreter's container is its tenant's (`container_owners`). A server without
virtual keys (the config's `keys` or managed keys: a keyless sidecar, shared keys only) has
one tenant: nothing is bound or checked there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from edgeroute import sse
from edgeroute.endpoints.container_owners import PREFIX as CONTAINER
from edgeroute.endpoints.pipeline import Stored
from edgeroute.errors import ProxyError
from edgeroute.owners import MAX_ID, bind_all, owner_of, record_size, stored_binding
from edgeroute.state import Live


def _tenants(request: web.Request, live: Live) -> bool:
    """Whether tenants are told apart: virtual keys in use (the config's, or managed ones)."""
    return live.access.keyed(request)


def not_found(response_id: str) -> ProxyError:
    """OpenAI's answer for an id it does not know (the same whether the id exists or not)."""
    shown = response_id[:MAX_ID]
    return ProxyError(
        404,
        f"Previous response with id '{shown}' not found.",
        code="previous_response_not_found",
        param="previous_response_id",
    )


# What an input item may carry beside its content: an item with nothing else names the stored
# item of that id (OpenAI's image editing "by image ID": `{"type": "image_generation_call", "id"}`).
_NOT_CONTENT = frozenset({"type", "id", "status", "role"})


def _id_only(item: dict[str, Any]) -> bool:
    """Whether an output item sent back as input is only its id (a built-in tool call, a message
    without its content, ...: left for the provider to read from its store), or an image generation call
    without its image (`result`), which the provider then takes from its store."""
    if item.get("id") is None:
        return False
    if item.get("type") == "image_generation_call" and not item.get("result"):
        return True
    return all(k in _NOT_CONTENT or v is None for k, v in item.items())


def _names_stored_state(raw: dict[str, Any]) -> None:
    """Refuses what names provider-side state no binding can confine: an input item referring
    to a stored item by id (`item_reference`; its type may be left out; an output item sent
    back as its id alone), which puts another tenant's answer into the prompt, and a stored
    `conversation` (made at the provider)."""
    if raw.get("conversation") is not None:
        raise ProxyError(
            400,
            "'conversation' names a conversation stored at the provider, which edgeroute cannot confine to this "
            "key's tenant: continue a response with previous_response_id.",
            param="conversation",
        )
    items = raw.get("input")
    for i, item in enumerate(items if isinstance(items, list) else ()):
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, dict) and (
            kind == "item_reference" or (kind is None and "role" not in item and "id" in item) or _id_only(item)
        ):
            raise ProxyError(
                400,
                f"'input[{i}]' names a stored item by its id, which edgeroute cannot confine to this key's tenant: "
                "send the item itself, or continue its response with previous_response_id.",
                param="input",
            )
        # A reasoning item without its encrypted_content is only its id: the provider reads the
        # reasoning it names from its store, whoever's it is.
        if kind == "reasoning" and isinstance(item, dict) and not item.get("encrypted_content"):
            raise ProxyError(
                400,
                f"'input[{i}]' is a reasoning item without its encrypted_content, which names stored reasoning "
                "edgeroute cannot confine to this key's tenant: send it with its encrypted_content (include "
                "reasoning.encrypted_content), or continue its response with previous_response_id.",
                param="input",
            )


def _stored_prompt(raw: dict[str, Any]) -> int:
    """How many of a stored prompt (`prompt.id`) and a stored `conversation` (refused with
    tenants) the request names: their text is at the provider, of a size no one here knows,
    and billed as prompt tokens."""
    prompt = raw.get("prompt")
    return int(isinstance(prompt, dict) and prompt.get("id") is not None) + int(raw.get("conversation") is not None)


async def check(request: web.Request, live: Live, raw: dict[str, Any]) -> Stored:
    """Refuses a `previous_response_id` the caller did not create, and stored items or
    conversations named by id (see the module's doc). Returns what the request names that the
    provider bills as prompt tokens: the continued conversation's size recorded with its id
    (unknown for an id bound before sizes were: the allowance), and a stored prompt."""
    prev = raw.get("previous_response_id")
    prompt = _stored_prompt(raw)
    if not _tenants(request, live):
        # One tenant: nothing is bound, so no size is known.
        return Stored(unknown=prompt + (prev is not None))
    _names_stored_state(raw)
    if prev is None:
        return Stored(unknown=prompt)
    if not isinstance(prev, str) or not prev:
        raise ProxyError(400, "'previous_response_id' must be a non-empty string.", param="previous_response_id")
    if len(prev) > MAX_ID:
        raise not_found(prev)
    owner, size = await stored_binding(request, prev, "a previous_response_id")
    if owner != owner_of(request):
        raise not_found(prev)
    return Stored(tokens=size or 0, unknown=prompt + (size is None))


def stream_id(head: bytes) -> str | None:
    """The id in a Responses stream's `response.created` event, among the bytes held so far."""
    splitter = sse.EventSplitter()
    for ev in splitter.feed(head if head.endswith(b"\n\n") else head + b"\n\n"):
        data = sse.event_data(ev)
        if data is None or data == b"[DONE]":
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("type") == "response.created":
            resp = obj.get("response")
            rid = resp.get("id") if isinstance(resp, dict) else None
            return rid if isinstance(rid, str) else None
    return None


def json_id(obj: dict[str, Any] | None) -> str | None:
    """The id of a JSON Response (its object, `container_owners.json_answer`)."""
    rid = obj.get("id") if obj is not None else None
    return rid if isinstance(rid, str) else None


async def bind(
    request: web.Request, live: Live, rid: str | None, containers: Iterable[str] = (), size: int | None = None
) -> None:
    """Binds the answer's id, with the conversation's `size` when known (a JSON answer's input
    and output tokens), and the containers it ran in (`container_owners`), to the caller in
    one write, before the answer is sent. A failed write is logged and the answer still sent:
    its id, unbound, is then refused as a `previous_response_id` (safe, and the answer itself
    was paid for). An id not seen (or not a provider's) is bound to no one: refused later."""
    if _tenants(request, live):
        named = {"": [rid] if rid is not None else [], CONTAINER: containers}
        sizes = {rid: size} if rid is not None and size is not None else None
        await bind_all(request, named, "a response or container id", sizes)


async def sized(request: web.Request, live: Live, rid: str | None, size: int | None) -> None:
    """Records the size of a stream's conversation at its end (its id was bound at its first
    event); a stream without its usage leaves it unknown (a continuation reserves the allowance)."""
    if _tenants(request, live) and rid is not None and size is not None:
        await record_size(request, rid, size)
