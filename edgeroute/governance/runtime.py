"""The governance state of one server: its store, its running version, its managed keys.

Kept apart from the HTTP handlers so that `reload.py` can tell it about an applied config
without importing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web

from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY
from edgeroute.errors import ProxyError
from edgeroute.governance import residency
from edgeroute.governance.keys import ManagedKeys, config_makers
from edgeroute.governance.store import STORE_DEADLINE_S, AuditRow, Gate, GovStore
from edgeroute.governance.versions import Saved, Versions, mask
from edgeroute.state import STATE, Live

log = logging.getLogger("edgeroute.governance")

Change = tuple[str, str | None, Any, Any]  # an audit entry for a change: action, target, before, after
_T = TypeVar("_T")
# Set by `answered` for the change it runs: `Gov.save` resolves it when the change's record was
# sent to the store and not confirmed within STORE_DEADLINE_S (the change waits on; its caller not).
_UNCONFIRMED: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar("unconfirmed", default=None)
_LOCK_LOOK_S = 0.25  # how often a change waiting for another one looks whether that one is stuck


_PROCESS_KEY = os.urandom(32)  # names shared keys where no governance store is (no audit either)


def actor_of(request: web.Request) -> str:
    """Who is acting: the caller's key id, a shared key's fingerprint, or where an
    unauthenticated (loopback) call came from."""
    ident = request.get(IDENTITY)
    if ident is not None:
        return str(ident.key)
    secret = gov.actors_key if (gov := request.app.get(GOV)) is not None else _PROCESS_KEY
    shared = request.app[STATE].live.access.shared_actor(request, secret)
    return shared or f"anonymous@{request.remote or '-'}"


class Gov:
    def __init__(self, store: GovStore, managed: ManagedKeys | None) -> None:
        self.store = store
        self.actors_key = store.actors_key()  # read once: the audit names shared keys by it
        self.versions = Versions(store)
        self.managed = managed
        self.lock = asyncio.Lock()  # one config change (rollback, deployment change) at a time
        self.unconfirmed = 0  # changes whose record the store has not confirmed past STORE_DEADLINE_S
        self.checking = False  # a `POST /admin/config/check` is running (one at a time)
        # Told of each applied generation (how, the version before): the rollback guard.
        self.on_applied: Callable[[Live, str, int | None], None] | None = None

    async def audit(self, actor: str, action: str, target: str | None, before: Any = None, after: Any = None) -> None:
        """Appends to the audit log; a failing database is logged, never raised to the caller
        (the change itself has already happened), and waited for at most STORE_DEADLINE_S: a
        write hung on a vanished peer held the caller's answer (a refused rollback's 409) as long."""
        write = asyncio.ensure_future(asyncio.to_thread(self.store.audit, actor, action, target, before, after))
        write.add_done_callback(_retrieved)
        try:
            await asyncio.wait_for(asyncio.shield(write), STORE_DEADLINE_S)
        except TimeoutError:
            log.error("audit log: %s %s by %s not confirmed within %g s (it may be written yet)",
                      action, target, actor, STORE_DEADLINE_S)  # fmt: skip
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

        self.versions.external_ref = new.governance.versions_key  # resolved off the loop, by `save`
        gate = Gate()
        job = asyncio.ensure_future(
            asyncio.to_thread(self.versions.save, text, how, actor, entries, audit_if_same, gate)
        )
        job.add_done_callback(_retrieved)
        try:
            return await self._recorded(job, gate)
        except Exception as e:
            log.error("config versions: cannot record the applied config or its audit (%s: %s)", type(e).__name__, e)
            return None

    async def _recorded(self, job: asyncio.Future[Saved], gate: Gate) -> Saved:
        """`job`'s version within STORE_DEADLINE_S. Past it, a record not sent yet never is
        (TimeoutError: nothing changed); one sent may still be committed, so the change waits for
        it (a change recorded is a change applied) while its caller is answered that it may have
        been applied (`answered`). The store's own bound (LOCK_WAIT_S) ends a call that waits
        for its connection sooner, nothing sent."""
        done, _ = await asyncio.wait({job}, timeout=STORE_DEADLINE_S)
        if done:
            return job.result()
        if gate.abandon():
            raise TimeoutError(f"the store did not answer within {STORE_DEADLINE_S:g} s; nothing was sent")
        log.error("config versions: the store has not confirmed a change's record within %g s; "
                  "the change is applied once it does", STORE_DEADLINE_S)  # fmt: skip
        if (waiting := _UNCONFIRMED.get()) is not None and not waiting.done():
            waiting.set_result(None)
        self.unconfirmed += 1
        try:
            return await job
        finally:
            self.unconfirmed -= 1

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Holds `lock` for a config change; a 503 (nothing changed) rather than a wait behind a
        change whose record the store has not confirmed (it waits as long as the store hangs)."""
        while True:
            if self.unconfirmed:
                raise ProxyError(
                    503,
                    "Another config change is still waiting for the config version store to confirm it: this "
                    "change was not applied. Look at GET /admin/config/versions, then try again.",
                    code="config_store_unavailable",
                    headers={"Retry-After": "5"},
                )
            try:
                await asyncio.wait_for(self.lock.acquire(), _LOCK_LOOK_S)
                break
            except TimeoutError:
                continue
        try:
            yield
        finally:
            self.lock.release()

    def activate(self, live: Live, saved: Saved, how: str) -> int | None:
        """Makes `saved` the running version, follows its residencies and starts the rollback
        guard's watch; returns the version before. Call in the same step as the swap (no await
        between), so that no request is answered by a generation whose version the admin API
        does not show yet, or that the guard does not count."""
        before = self.versions.active
        self.versions.activate(saved)
        self.store.audit_retention_s = live.config.governance.audit_retention_s
        if self.managed is not None:
            cfg = live.config
            self.managed.set_region_of(
                lambda key_id, team, own: residency.region_of(cfg, key_id, team, own),
                config_makers(cfg, live.access.ring.digests if live.access.ring is not None else None),
            )
        if self.on_applied is not None:
            self.on_applied(live, how, before)
        return before


async def answered(change: Coroutine[Any, Any, _T]) -> _T:
    """Awaits a config change (run `reload.to_the_end`) until it ends, or until its record was
    sent to the store and not confirmed within STORE_DEADLINE_S: then a 503 saying it may have
    been applied, while it goes on (applied once the store records it, not at all if it
    refuses). A change not sent by then ends with the 503 that says nothing changed. An apply on
    a hung store answered when the connection's keepalives gave up, long past any client's
    patience."""
    unconfirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    token = _UNCONFIRMED.set(unconfirmed)
    try:
        task = asyncio.ensure_future(change)  # runs with `unconfirmed` in its context
    finally:
        _UNCONFIRMED.reset(token)
    task.add_done_callback(_retrieved)
    either: set[asyncio.Future[Any]] = {task, unconfirmed}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    raise ProxyError(
        503,
        f"The config version store did not confirm this change within {STORE_DEADLINE_S:g} s. Its record was "
        "sent, so the change may have been applied: it is applied once the store records it, and not at all if "
        "the store refuses it. Look at GET /admin/config/versions (edgeroute config versions) before trying again.",
        code="config_change_unconfirmed",
        headers={"Retry-After": "5"},
    )


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Marks a background job's exception as seen (its waiter, if any, handles it)."""
    if not fut.cancelled():
        fut.exception()


GOV = web.AppKey("governance", Gov)
