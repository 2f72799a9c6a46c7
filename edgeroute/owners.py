"""Who an id kept at the provider is bound to: the caller's owner, looked up and bound.

Responses ids (`endpoints.responses_owners`), code execution containers
(`endpoints.container_owners`) and chat audio (`audio_owners`) are each bound to who made the
request that gave them, in the governance table `gov_response_owners` (SQLite or PostgreSQL:
shared by workers and instances, kept across restarts), and named again only by that owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

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
    """Who `key` is bound to (None: no one). A database that cannot answer is a 503: the id
    cannot be checked, so it is not used."""
    try:
        return await asyncio.to_thread(request.app[GOV].store.response_owner, key)
    except Exception as e:
        log.warning("could not look up the owner of a %s: %s", what, type(e).__name__)
        raise ProxyError(
            503, f"edgeroute could not check {what}; retry shortly.", code="owner_check_unavailable"
        ) from None


async def bind_all(request: web.Request, keys: Iterable[str], what: str) -> None:
    """Binds each key to the caller. A failed write is logged: the id, unbound, is then refused
    when named (safe; the answer that gave it was paid for)."""
    store, owner = request.app[GOV].store, owner_of(request)
    ordered = sorted(set(keys))

    def write() -> None:
        for key in ordered:
            store.bind_response(key, owner)

    try:
        await asyncio.to_thread(write)
    except Exception as e:
        log.warning("could not bind %s to its key (it cannot be named again): %s", what, type(e).__name__)
