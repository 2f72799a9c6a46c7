"""The governance state of one server: its store, its running version, its managed keys.

Kept apart from the HTTP handlers so that `reload.py` can tell it about an applied config
without importing them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY
from edgeroute.governance import residency
from edgeroute.governance.keys import ManagedKeys
from edgeroute.governance.store import GovStore
from edgeroute.governance.versions import Saved, Versions, digest, mask
from edgeroute.state import Live

log = logging.getLogger("edgeroute.governance")


def actor_of(request: web.Request) -> str:
    """Who is acting: the caller's key id, or where an unauthenticated (loopback) call came from."""
    ident = request.get(IDENTITY)
    if ident is not None:
        return str(ident.key)
    return f"anonymous@{request.remote or '-'}"


class Gov:
    def __init__(self, store: GovStore, managed: ManagedKeys | None) -> None:
        self.store = store
        self.versions = Versions(store)
        self.managed = managed
        self.lock = asyncio.Lock()  # one config change (rollback, deployment change) at a time
        # Told of each applied generation (how, the version before): the rollback guard.
        self.on_applied: Callable[[Live, str, int | None], None] | None = None

    async def audit(self, actor: str, action: str, target: str | None, before: Any = None, after: Any = None) -> None:
        """Appends to the audit log; a failing database is logged, never raised to the caller
        (the change itself has already happened)."""
        try:
            await asyncio.to_thread(self.store.audit, actor, action, target, before, after)
        except Exception as e:
            log.error("audit log: cannot write %s %s by %s (%s)", action, target, actor, type(e).__name__)

    async def save(self, text: str, how: str, actor: str | None) -> Saved | None:
        """Stores a config about to be swapped in as the next version; None (logged) when the
        database cannot."""
        try:
            return await asyncio.to_thread(self.versions.save, text, how, actor)
        except Exception as e:
            log.error("config versions: cannot record the applied config (%s)", type(e).__name__)
            return None

    def activate(self, live: Live, saved: Saved, how: str) -> int | None:
        """Makes `saved` the running version, follows its residencies and starts the rollback
        guard's watch; returns the version before. Call in the same step as the swap (no await
        between), so that no request is answered by a generation whose version the admin API
        does not show yet, or that the guard does not count."""
        before = self.versions.active
        self.versions.activate(saved)
        if self.managed is not None:
            cfg = live.config
            self.managed.set_region_of(lambda key_id, team, own: residency.region_of(cfg, key_id, team, own))
        if self.on_applied is not None:
            self.on_applied(live, how, before)
        return before

    async def applied(
        self, live: Live, saved: Saved, how: str, actor: str | None, before: int | None, previous: Config | None = None
    ) -> None:
        """Audits a config swapped in (after `activate`)."""
        after = {"version": saved.version, "hash": digest(saved.stored), "source": how}
        await self.audit(actor or how, "config." + how.split(":")[0], "config", {"version": before}, after)
        if previous is not None and previous.budgets != live.config.budgets:
            # Masked as every view of a config is (a notify webhook's URL may be its credential).
            old, new = (
                mask({"budgets": b.model_dump(mode="json")})["budgets"] for b in (previous.budgets, live.config.budgets)
            )
            await self.audit(actor or how, "budget.changed", "budgets", old, new)


GOV = web.AppKey("governance", Gov)
