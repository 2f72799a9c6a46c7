"""Settlement: a request's reservations become its actual cost and its token estimates the
tokens it used; a refused request gives back what it took. A managed key's request also adds
its cost to the monthly counter of each key above it (itself included) that it reserved nothing
in, having no budget when it was admitted (`cost.keys.key_counter`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from edgeroute.accounting import RequestRecord, Usage
from edgeroute.cost import budgets as B
from edgeroute.cost import restore
from edgeroute.cost.control.liveness import Liveness
from edgeroute.cost.control.parallel import ParallelSlots
from edgeroute.cost.control.stores import Stores
from edgeroute.cost.control.ticket import CostTicket, Held
from edgeroute.cost.keys import key_budget_name, key_counter
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.redis_store import RedisState


def _total(u: Usage) -> int:
    return u.prompt_tokens + u.completion_tokens


def _tokens_used(rec: RequestRecord, h: Held) -> int | None:
    """Actual tokens to settle `h` to, every attempt's; None: nothing was measured. A
    deployment's `h` is settled only when an attempt reached that deployment. A request that
    made no attempt (a cache hit, one refused before it was sent) used none:
    it counted against RPM as a request, and the ledger records it with no tokens, which is
    what a restart reads the window back from."""
    if h.deployment is None:
        if rec.usage is None and not rec.attempts:
            return 0
        # Every attempt's, as the ledger and budgets count them: a hedge that lost was sent
        # (and billed) too, where only the winner's answer was counted.
        billed = sum(_total(a.usage) for a in rec.attempts if a.usage is not None)
        if rec.usage is not None:
            return max(billed, _total(rec.usage))
        return billed or None
    measured = [_total(a.usage) for a in rec.attempts if a.deployment == h.deployment and a.usage is not None]
    return sum(measured) if measured else None


class Settlement(Stores):
    """Held reservations and settlement (a part of `CostControl`)."""

    # Reserved and not yet settled, per store key (what `/admin/budgets` shows as reserved).
    reserved: dict[str, int]
    ledger: Ledger | None  # reservations are journaled with its batches
    # The calendar month (UTC) of managed keys' counters, and their store keys in it by key id.
    _months: tuple[B.Period, dict[str, str]]
    parallel: ParallelSlots  # the keys' requests in flight (`max_parallel`)
    liveness: Liveness | None  # with Redis and a ledger: this run's, and who records a dead one's requests

    def _hold(self, request_id: str, now: float, charges: list[B.Charge]) -> None:
        """Notes the reservations as held until settled, and journals them with the ledger."""
        for c in charges:
            self.reserved[c.store_key] = self.reserved.get(c.store_key, 0) + c.amount
        if self.ledger is not None:
            self.ledger.journal_all(request_id, now, [(c.store_key, c.amount) for c in charges])

    def _journal_takes(self, request_id: str, now: float, held: list[Held]) -> None:
        """Journals what an admitted request took from its rate limits, so that a restart after
        a crash counts it while it was in flight (`restore.bucket_usage`)."""
        if self.ledger is None:
            return
        takes = [(restore.bucket_key(t.name, t.kind, t.limit), math.ceil(t.amount)) for h in held for t in h.takes]
        self.ledger.journal_all(request_id, now, takes)

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
        self._free_slots(ticket)
        actual = B.charge_nano(rec.cost_usd)
        if ticket.charges and (lv := self.liveness) is not None and lv.doubtful(ticket.run_epoch):
            # Another instance may have recorded it as crashed meanwhile (this one was paused
            # or cut off): its spend and its row wait for Redis to say which of the two does.
            rec.held_back = True
            lv.defer(
                ticket.request_id,
                ticket.run_epoch,
                lambda: self._settle_late(ticket, rec, actual),
                lambda: self._recorded_elsewhere(ticket, rec),
            )
        else:
            self._settle_spend(ticket, actual)
        for h in ticket.held:
            if h.deployment is not None and not any(a.deployment == h.deployment for a in rec.attempts):
                # Never sent there (a cache hit, a failover, a downgrade): its provider saw
                # nothing, so its request and tokens go back, as for a refused request.
                self._give(h.takes, [-t.amount for t in h.takes], h.shared)
                h.give_back_hold()
                continue
            used = _tokens_used(rec, h)
            tokens = [t for t in h.takes if t.kind == "tokens"]
            if used is not None:
                self._give(tokens, [used - t.amount for t in tokens], h.shared)
            elif held := [t for t in tokens if t.hold]:
                # Nothing measured (an upstream error without usage): the prompt stays counted,
                # the output held for it goes back (kept, it drained the TPM a minute).
                self._give(held, [-t.hold for t in held], h.shared)

    def _settle_spend(self, ticket: CostTicket, actual: int) -> None:
        """The request's reservations become its cost `actual` (nano-USD)."""
        if ticket.charges:
            self._unhold(ticket.charges)
            deltas = [actual - c.amount for c in ticket.charges]
            self._adjust(ticket.charges, deltas, ticket.charges_shared, ticket.charges_generation, ticket.request_id)
            if not ticket.charges_shared and isinstance(self.shared, RedisState):
                # Admitted while Redis was down: the other instances never saw it (they
                # admitted the whole budget again once Redis was back).
                self.shared.spent_later(ticket.charges, actual)
            self._settled(ticket.charges)
        if actual > 0 and ticket.identity.spends_for:
            self._count_keys(ticket, actual)

    def _settle_late(self, ticket: CostTicket, rec: RequestRecord, actual: int) -> None:
        """A doubtful request this instance settles after all (no other recorded it)."""
        self._settle_spend(ticket, actual)
        if self.ledger is not None:
            self.ledger.release(rec, write=True)

    def _recorded_elsewhere(self, ticket: CostTicket, rec: RequestRecord) -> None:
        """A doubtful request another instance recorded as crashed, at its reservation: the
        reservation stays counted as its cost (in Redis, where this instance's counters follow
        it), and it writes no row of its own."""
        self._unhold(ticket.charges)
        if not ticket.charges_shared and isinstance(self.shared, RedisState):
            self.shared.spent_later(ticket.charges, ticket.charges[0].amount)  # each charge is the whole reservation
        self._settled(ticket.charges)
        if self.ledger is not None:
            self.ledger.release(rec, write=False)

    def _count_keys(self, ticket: CostTicket, actual: int) -> None:
        """Adds the request's cost to the monthly counter of each managed key above its key
        (itself included) that it reserved nothing in: no budget when it was admitted, one
        given meanwhile or never. In the shared store when there is one (a count it never
        received is sent again once it is back, as settlements are), else in this process."""
        month, names = self._months
        if not month.starts_at <= ticket.started < month.resets_at:
            month = B.period_of(key_counter(ticket.identity.spends_for[0]), ticket.started)
            self._months = month, names = (month, {})
        reserved = {c.budget.name for c in ticket.charges}
        counters = []
        for key_id in ticket.identity.spends_for:
            if key_budget_name(key_id) in reserved:
                continue
            name = names.get(key_id)
            if name is None:
                name = names[key_id] = f"{key_budget_name(key_id)}:{key_id}:{month.id}"
            counters.append(name)
        if self.shared is not None:
            self.shared.count_later(counters, actual, month.ttl_s)
        else:
            for name in counters:
                self.local_budgets.add_read_back(name, actual, period=month)

    def _release(self, ticket: CostTicket) -> list[asyncio.Task[None] | None]:
        """Gives back what a refused request took: its reservations, its token estimates and its
        deployment's request (the provider never saw it). Key and model limits still count the
        request itself, as OpenAI counts unsuccessful requests against requests per minute."""
        self._free_slots(ticket)
        tasks = []
        for h in ticket.held:
            back = [t for t in h.takes if t.kind == "tokens" or h.deployment is not None]
            tasks.append(self._give(back, [-t.amount for t in back], h.shared))
            if h.deployment is not None:
                h.give_back_hold()
        if ticket.charges:
            self._unhold(ticket.charges)
            given = [-c.amount for c in ticket.charges]
            gen, request_id = ticket.charges_generation, ticket.request_id
            tasks.append(self._adjust(ticket.charges, given, ticket.charges_shared, gen, request_id))
        ticket.held, ticket.charges = [], []
        return tasks

    def _free_slots(self, ticket: CostTicket) -> None:
        """Gives back the `max_parallel` slots the request holds, once (settled or refused)."""
        if ticket.parallel:
            self.parallel.release(ticket.parallel, ticket.parallel_leased)
            ticket.parallel, ticket.parallel_leased = [], False
