"""The governance state of one server: its store, its running version, its managed keys.

Kept apart from the HTTP handlers so that `reload.py` can tell it about an applied config
without importing them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY
from edgeroute.governance import residency
from edgeroute.governance.keys import ManagedKeys
from edgeroute.governance.store import AuditRow, GovStore
from edgeroute.governance.versions import Saved, Versions, mask
from edgeroute.state import Live

log = logging.getLogger("edgeroute.governance")

Change = tuple[str, str | None, Any, Any]  # an audit entry for a change: action, target, before, after


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
        self.checking = False  # a `POST /admin/config/check` is running (one at a time)
        # Told of each applied generation (how, the version before): the rollback guard.
        self.on_applied: Callable[[Live, str, int | None], None] | None = None

    async def audit(self, actor: str, action: str, target: str | None, before: Any = None, after: Any = None) -> None:
        """Appends to the audit log; a failing database is logged, never raised to the caller
        (the change itself has already happened)."""
        try:
            await asyncio.to_thread(self.store.audit, actor, action, target, before, after)
        except Exception as e:
            log.error("audit log: cannot write %s %s by %s (%s)", action, target, actor, type(e).__name__)

    async def save(
        self,
        text: str,
        how: str,
        actor: str | None,
        change: tuple[Config, Config],
        extra: Sequence[Change] = (),
        audit_if_same: bool = True,
    ) -> Saved | None:
        """Stores a config about to be swapped in as the next version, with its audit entries
        in the same transaction (the version's, a budget change's, then `extra`, the caller's
        account of what it changed): a process killed after the swap cannot leave the change
        recorded without them, nor them without it. `change` is (the running config, the new
        one). None (logged) when the database cannot."""
        before, (previous, new) = self.versions.active, change
        who = actor or how

        def entries(version: int, hash_: str) -> list[AuditRow]:
            after = {"version": version, "hash": hash_, "source": how}
            rows: list[AuditRow] = [(who, "config." + how.split(":")[0], "config", {"version": before}, after)]
            if previous.budgets != new.budgets:
                # Masked as every view of a config is (a notify webhook's URL may be its credential).
                old, now = (
                    mask({"budgets": b.model_dump(mode="json")})["budgets"] for b in (previous.budgets, new.budgets)
                )
                rows.append((who, "budget.changed", "budgets", old, now))
            rows += [(who, action, target, was, now) for action, target, was, now in extra]
            return rows

        try:
            return await asyncio.to_thread(self.versions.save, text, how, actor, entries, audit_if_same)
        except Exception as e:
            log.error("config versions: cannot record the applied config or its audit (%s)", type(e).__name__)
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


GOV = web.AppKey("governance", Gov)
