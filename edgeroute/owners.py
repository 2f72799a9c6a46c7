"""Who an id kept at the provider is bound to: the caller's owner, looked up and bound.

Responses ids (`endpoints.responses_owners`), code execution containers
(`endpoints.container_owners`) and chat audio (`audio_owners`) are each bound to who made the
request that gave them, in the governance table `gov_response_owners` (SQLite or PostgreSQL:
shared by workers and instances, kept across restarts), and named again only by that owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

from aiohttp import web

from edgeroute.cost.keys import IDENTITY
from edgeroute.errors import ProxyError
from edgeroute.governance.runtime import GOV

log = logging.getLogger("edgeroute.owners")

MAX_ID = 256  # a longer id is no provider's: refused without a lookup


def owner_of(request: web.Request) -> str:
    ident = request.get(IDENTITY)
    if ident is None:
        return "shared"  # a shared `server.api_keys` key: its callers are one tenant
    return f"team:{ident.team}" if ident.team else f"key:{ident.key}"


async def stored_owner(request: web.Request, key: str, what: str) -> str | None:
    """Who `key` is bound to (None: no one). `what` names the id with its article ("an audio
    id"). A database that cannot answer is a 503: the id cannot be checked, so it is not used."""
    return (await stored_binding(request, key, what))[0]


async def stored_binding(request: web.Request, key: str, what: str) -> tuple[str | None, int | None]:
    """(who `key` is bound to, the conversation's size recorded with it), as `stored_owner`."""
    try:
        return await asyncio.to_thread(request.app[GOV].store.response_binding, key)
    except Exception as e:
        log.warning("could not look up the owner of %s: %s", what, type(e).__name__)
        raise ProxyError(
            503, f"edgeroute could not check {what}; retry shortly.", code="owner_check_unavailable"
        ) from None


async def bind_all(
    request: web.Request, named: Mapping[str, Iterable[str]], what: str, sizes: Mapping[str, int] | None = None
) -> None:
    """Binds each id `named` gives under its prefix (`{prefix: ids}`) to the caller, in one
    write, with the conversation's size `sizes` gives an id; an empty id, or one longer than
    `MAX_ID` (no provider's), is left out. A failed write is logged: the ids, unbound, are then
    refused when named (safe; the answer that gave them was paid for)."""
    keys = sorted({prefix + i for prefix, ids in named.items() for i in ids if i and len(i) <= MAX_ID})
    if not keys:
        return
    try:
        await asyncio.to_thread(request.app[GOV].store.bind_responses, keys, owner_of(request), sizes)
    except Exception as e:
        log.warning("could not bind %s to its key (it cannot be named again): %s", what, type(e).__name__)


async def record_size(request: web.Request, key: str, tokens: int) -> None:
    """Records the size of the caller's conversation `key` once known (a stream's, at its end). A
    failed write is logged: a continuation of it then reserves the allowance for an unknown size."""
    if not key or len(key) > MAX_ID:
        return
    try:
        await asyncio.to_thread(request.app[GOV].store.size_response, key, owner_of(request), tokens)
    except Exception as e:
        log.warning("could not record the size of a conversation: %s", type(e).__name__)
