"""Settlement: a request's reservations become its actual cost and its token estimates the
tokens it used; a refused request gives back what it took. A managed key's request also adds
its cost to the monthly counter of each key above it (itself included) that it reserved nothing
in, having no budget when it was admitted (`cost.keys.key_counter`)."""

from __future__ import annotations

import asyncio
from typing import Any

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.cost import budgets as B
from edgeroute.cost.control.stores import Stores
from edgeroute.cost.control.ticket import CostTicket, Held
from edgeroute.cost.keys import key_counter
from edgeroute.cost.ledger import Ledger


def _total(u: Usage) -> int:
    return u.prompt_tokens + u.completion_tokens


def _tokens_used(rec: RequestRecord, h: Held) -> int | None:
    """Actual tokens to settle `h` to; None keeps the estimate (nothing was measured). A
    deployment's `h` is settled only when an attempt reached that deployment."""
    if h.deployment is None:
        return _total(rec.usage) if rec.usage is not None else None
    measured = [_total(a.usage) for a in rec.attempts if a.deployment == h.deployment and a.usage is not None]
    return sum(measured) if measured else None


class Settlement(Stores):
    """Held reservations and settlement (a part of `CostControl`)."""

    # Reserved and not yet settled, per store key (what `/admin/budgets` shows as reserved).
    reserved: dict[str, int]
    ledger: Ledger | None  # reservations are journaled with its batches
    _month: B.Period | None  # the calendar month (UTC) of managed keys' counters, computed once a month

    def _hold(self, request_id: str, now: float, charges: list[B.Charge]) -> None:
        """Notes the reservations as held until settled, and journals them with the ledger."""
        for c in charges:
            self.reserved[c.store_key] = self.reserved.get(c.store_key, 0) + c.amount
            if self.ledger is not None:
                self.ledger.journal(request_id, now, c.store_key, c.amount)

    def _unhold(self, charges: list[B.Charge]) -> None:
        for c in charges:
            left = self.reserved.get(c.store_key, 0) - c.amount
            if left > 0:
                self.reserved[c.store_key] = left
            else:
                self.reserved.pop(c.store_key, None)

    def settle(self, ticket: Any, rec: RequestRecord) -> None:
        if not isinstance(ticket, CostTicket):
            return
        actual = B.to_nano(rec.cost_usd)
        counts = self._key_counts(ticket, actual) if ticket.identity.spends_for and actual > 0 else []
        # Counted where the budgets are, even while the shared store is failing: a delta it
        # never received is sent again with the next batch once it is back (`redis_store`).
        counts_shared = self.shared is not None
        if ticket.charges:
            self._unhold(ticket.charges)
            charges, deltas = ticket.charges, [actual - c.amount for c in ticket.charges]
            if counts and counts_shared == ticket.charges_shared:  # one adjustment (one transaction)
                charges, deltas, counts = [*charges, *counts], [*deltas, *(actual for _ in counts)], []
            self._adjust(charges, deltas, ticket.charges_shared, counts=len(charges) - len(ticket.charges))
        if counts:
            self._adjust(counts, [actual] * len(counts), counts_shared, counts=len(counts))
        for h in ticket.held:
            if h.deployment is not None and not any(a.deployment == h.deployment for a in rec.attempts):
                # Never sent there (a cache hit, a failover, a downgrade): its provider saw
                # nothing, so its request and tokens go back, as for a refused request.
                self._give(h.takes, [-t.amount for t in h.takes], h.shared)
                continue
            used = _tokens_used(rec, h)
            if used is not None:
                tokens = [t for t in h.takes if t.kind == "tokens"]
                self._give(tokens, [used - t.amount for t in tokens], h.shared)

    def _key_counts(self, ticket: CostTicket, actual: int) -> list[B.Charge]:
        """The counters of the managed keys above the request's key (itself included) that it
        reserved nothing in: no budget when it was admitted, one given meanwhile or never."""
        reserved = {c.budget.name for c in ticket.charges}
        month = self._month
        if month is None or not month.starts_at <= ticket.started < month.resets_at:
            month = self._month = B.period_of(key_counter(ticket.identity.spends_for[0]), ticket.started)
        out = []
        for key_id in ticket.identity.spends_for:
            b = key_counter(key_id)
            if b.name not in reserved:
                out.append(B.charge(b, key_id, month, actual, -1))
        return out

    def _release(self, ticket: CostTicket) -> list[asyncio.Task[None] | None]:
        """Gives back what a refused request took: its reservations, its token estimates and its
        deployment's request (the provider never saw it). Key and model limits still count the
        request itself, as OpenAI counts unsuccessful requests against requests per minute."""
        tasks = []
        for h in ticket.held:
            back = [t for t in h.takes if t.kind == "tokens" or h.deployment is not None]
            tasks.append(self._give(back, [-t.amount for t in back], h.shared))
        if ticket.charges:
            self._unhold(ticket.charges)
            tasks.append(self._adjust(ticket.charges, [-c.amount for c in ticket.charges], ticket.charges_shared))
        ticket.held, ticket.charges = [], []
        return tasks
