"""Budgets: spend limits per key, team, user, model group or globally, over a calendar
day or month or a rolling window, with actions at thresholds (notify, downgrade, block).

Enforced by reservation: at admission a request reserves its estimated maximum cost in
every budget it falls under, all or nothing, and is refused when a reservation would
cross a `block` threshold; at settlement the reservation is replaced by the actual cost.
Concurrent requests therefore cannot overshoot a budget by more than the estimates'
error. Amounts are integers of nano-USD so that Redis and the local store add exactly.

This module holds the policy and the in-process store; `redis_store` holds the same
store shared across instances.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from edgeroute.config import Budget, BudgetAction

NANO = 1_000_000_000
ROLLING_SLOTS = 60  # a rolling window is kept as this many slots


def to_nano(usd: float) -> int:
    return round(usd * NANO)


@dataclass(slots=True, frozen=True)
class Period:
    """Where a charge goes: `id` names the calendar period (or the rolling slot size), `slot`
    the rolling slot, `first_slot` the oldest slot still inside the window."""

    id: str
    resets_at: float  # unix seconds: end of the calendar period, or when the oldest slot expires
    ttl_s: int
    slot: int = -1
    first_slot: int = -1
    starts_at: float = 0.0  # unix seconds: start of the calendar period, or of the oldest slot
    slot_s: float = 0.0  # a rolling slot's length

    @property
    def rolling(self) -> bool:
        return self.slot >= 0


def period_of(b: Budget, now: float) -> Period:
    if b.period == "rolling":
        assert b.window_hours is not None
        window = b.window_hours * 3600
        size = window / ROLLING_SLOTS
        slot = int(now // size)
        first = slot - ROLLING_SLOTS + 1
        return Period(
            f"r{int(size)}", (first + ROLLING_SLOTS) * size, int(window) + 60, slot, first, first * size, size
        )
    tz = dt.timezone(dt.timedelta(minutes=b.utc_offset_minutes))
    local = dt.datetime.fromtimestamp(now, tz)
    if b.period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
        return Period(start.strftime("%Y-%m-%d"), end.timestamp(), 2 * 86400, starts_at=start.timestamp())
    days = calendar.monthrange(local.year, local.month)[1]
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start + dt.timedelta(days=days)
    return Period(start.strftime("%Y-%m"), end.timestamp(), 32 * 86400, starts_at=start.timestamp())


@dataclass(slots=True, frozen=True)
class Charge:
    """One request's reservation in one budget instance."""

    budget: Budget
    subject: str  # the key id, team, user or model; "*" for global
    period: Period
    amount: int  # nano-USD
    block_at: int  # nano-USD; -1: this budget never blocks
    store_key: str = ""  # "{budget}:{subject}:{period}", see `charge()`


def charge(budget: Budget, subject: str, period: Period, amount: int, block_at: int) -> Charge:
    return Charge(budget, subject, period, amount, block_at, f"{budget.name}:{subject}:{period.id}")


def block_limit(b: Budget) -> int:
    pcts = [a.at_percent for a in b.actions if a.action == "block"]
    return to_nano(b.limit_usd * min(pcts) / 100) if pcts else -1


def crossed(b: Budget, used: int, kind: str) -> BudgetAction | None:
    """The highest action of `kind` whose threshold `used` has reached."""
    best: BudgetAction | None = None
    for a in b.actions:
        if a.action == kind and used >= b.limit_usd * a.at_percent / 100 * NANO:
            if best is None or a.at_percent > best.at_percent:
                best = a
    return best


@dataclass(slots=True)
class Reserved:
    ok: bool
    used_before: list[int]  # per charge, nano-USD, before this reservation
    blocked: int = -1  # index of the refusing charge


class BudgetStore(Protocol):
    async def reserve(self, charges: list[Charge], now: float) -> Reserved: ...

    def adjust(self, charges: list[Charge], deltas: list[int]) -> None:
        """Adds `deltas` (actual - reserved), without a check; may complete later."""
        ...

    async def close(self) -> None: ...


class LocalBudgetStore:
    """The in-process store: one dict, checked and charged synchronously (atomic on the loop)."""

    def __init__(self) -> None:
        self._cal: dict[str, int] = {}
        self._rolling: dict[str, dict[int, int]] = {}

    def used(self, c: Charge) -> int:
        if not c.period.rolling:
            return self._cal.get(c.store_key, 0)
        slots = self._rolling.get(c.store_key)
        if not slots:
            return 0
        for s in [s for s in slots if s < c.period.first_slot]:
            del slots[s]
        return sum(slots.values())

    def _add(self, c: Charge, amount: int) -> None:
        if c.period.rolling:
            slots = self._rolling.setdefault(c.store_key, {})
            slots[c.period.slot] = slots.get(c.period.slot, 0) + amount
        else:
            self._cal[c.store_key] = self._cal.get(c.store_key, 0) + amount

    def reserve_now(self, charges: list[Charge]) -> Reserved:
        used = [self.used(c) for c in charges]
        for i, (c, u) in enumerate(zip(charges, used, strict=True)):
            if c.block_at >= 0 and u + c.amount > c.block_at:
                return Reserved(False, used, i)
        for c in charges:
            self._add(c, c.amount)
        return Reserved(True, used)

    async def reserve(self, charges: list[Charge], now: float) -> Reserved:
        return self.reserve_now(charges)

    def adjust(self, charges: list[Charge], deltas: list[int]) -> None:
        for c, d in zip(charges, deltas, strict=True):
            if d:
                self._add(c, d)

    async def close(self) -> None:
        return None

    def at_least(self, c: Charge, used: int) -> None:
        """Raises `c`'s counter to `used` (what the shared store said it held) where it is lower."""
        if (more := used - self.used(c)) > 0:
            self._add(c, more)

    def add_read_back(self, store_key: str, amount: int, slot: int = -1) -> None:
        """Adds spend read back from the ledger to a counter (a rolling window's `slot`)."""
        if slot >= 0:
            slots = self._rolling.setdefault(store_key, {})
            slots[slot] = slots.get(slot, 0) + amount
        else:
            self._cal[store_key] = self._cal.get(store_key, 0) + amount

    def counters(self) -> dict[str, int]:
        """Every counter: store key -> nano-USD used (a rolling window's slots summed, stale ones too)."""
        out = dict(self._cal)
        for k, slots in self._rolling.items():
            out[k] = sum(slots.values())
        return out
