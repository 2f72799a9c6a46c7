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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgeroute.config import Budget, BudgetAction

NANO = 1_000_000_000
ROLLING_SLOTS = 60  # a rolling window is kept as this many slots
SWEEP_EVERY_S = 60.0  # how often the local store drops the counters of ended periods
SWEEP_MOST = 2000  # counters looked at per sweep: a month's end with many keys is spread out
_LATEST_OFFSET_S = 14 * 3600  # a local date's period ends at most this long after UTC's
# Spend read back from the ledger is at most this far ahead of the clock (a clock that moved
# back: `restore` still counts it).
READ_AHEAD_S = 86400.0


# The most one request's charge (or a period's spend read back) counts, in nano-USD: about
# $72 million, far past any budget, so such a charge still exhausts it. A budget counter in
# Redis (or the workers' SQLite) is a 64-bit integer: an absurd cost (a careless upstream's
# 2^40 tokens at thousands of dollars a million) past 2^63 made the settlement fail, and the
# budget kept only the request's reservation while the ledger held the whole cost.
MAX_CHARGE_NANO = 1 << 56


def to_nano(usd: float) -> int:
    return round(usd * NANO)


def charge_nano(usd: float) -> int:
    """A charge in nano-USD, at most `MAX_CHARGE_NANO`."""
    return min(round(usd * NANO), MAX_CHARGE_NANO)


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


def counter_end(period: Period) -> float:
    """When a counter charged in `period` is read for the last time: the calendar period's end,
    or when the charged rolling slot leaves the window."""
    if period.rolling:
        return (period.slot + ROLLING_SLOTS) * period.slot_s
    return period.resets_at


def _end_of_key(store_key: str, slot: int, now: float) -> float:
    """`counter_end` for a counter read back by name (`charge`'s store key) at `now`: never
    earlier than the real end (a day's or month's offset is unknown here, a rolling slot's size
    rounded down in the name); infinite for a name it cannot read."""
    pid = store_key.rpartition(":")[2]
    try:
        if pid.startswith("r") and slot >= 0:
            # The slot starts at most READ_AHEAD_S from now. Its number times the larger size
            # alone was as far off as the number is large: a year late for slots of a minute.
            most = int(pid[1:]) + 1.0
            return min((slot + ROLLING_SLOTS) * most, now + READ_AHEAD_S + ROLLING_SLOTS * most)
        year, month = int(pid[:4]), int(pid[5:7])
        if len(pid) == 10:  # a day: YYYY-MM-DD
            return calendar.timegm((year, month, int(pid[8:]), 0, 0, 0)) + 86400 + _LATEST_OFFSET_S
        if len(pid) == 7:  # a month: YYYY-MM
            days = calendar.monthrange(year, month)[1]
            return calendar.timegm((year, month, 1, 0, 0, 0)) + days * 86400 + _LATEST_OFFSET_S
    except (ValueError, OverflowError):
        pass
    return math.inf


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
    generation: str = ""  # Redis's: the generation of the counters reserved in (`redis_scripts`)


class BudgetStore(Protocol):
    async def reserve(self, charges: list[Charge], now: float) -> Reserved: ...

    def adjust(self, charges: list[Charge], deltas: list[int]) -> None:
        """Adds `deltas` (actual - reserved), without a check; may complete later."""
        ...

    async def close(self) -> None: ...


class LocalBudgetStore:
    """The in-process store: one dict, checked and charged synchronously (atomic on the loop).

    A counter is dropped once its period has ended (`counter_end`), a few thousand at a time
    (`SWEEP_MOST`, every `SWEEP_EVERY_S` while charges come, every second while ended ones
    are left): every key, team and user's counters of every day and month would otherwise
    stay for as long as the process runs. `clock` is the time sweeps go by."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._cal: dict[str, int] = {}
        self._rolling: dict[str, dict[int, int]] = {}
        self._ends: dict[str, float] = {}  # store key -> when it is read for the last time
        self._ending: dict[int, list[str]] = {}  # hour of an end -> the keys that may end in it
        # Every counter in the order it was made, for `to_follow`'s turns (a pass costs its
        # batch, not a list of every counter: 20 ms a second at 250,000); dropped ones stay
        # until they are half of it (`_dropped`).
        self._order: list[str] = []
        self._dropped = 0
        self._swept_at = self._next_sweep = 0.0
        self._clock = clock if clock is not None else time.time  # looked up now: a test's clock too

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
            if (slots := self._rolling.get(c.store_key)) is None:
                slots = self._rolling[c.store_key] = {}
                self._order.append(c.store_key)
            slots[c.period.slot] = slots.get(c.period.slot, 0) + amount
        elif (was := self._cal.get(c.store_key)) is None:
            self._cal[c.store_key] = amount
            self._order.append(c.store_key)
        else:
            self._cal[c.store_key] = was + amount
        self._keep_until(c.store_key, counter_end(c.period))

    def _keep_until(self, store_key: str, end: float) -> None:
        old = self._ends.get(store_key)
        if old is None or old < end:
            self._ends[store_key] = end
            if not math.isinf(end) and (old is None or old // 3600 != end // 3600):
                self._ending.setdefault(int(end // 3600), []).append(store_key)
        # On every charge, not only a counter's first of a period: else what ended was looked
        # at only as often as counters began (a few a day under steady keys, 2,000 each time).
        now = self._clock()
        if now >= self._next_sweep or now < self._swept_at:  # or the clock went back
            self.sweep(now)

    def sweep(self, now: float) -> int:
        """Looks at up to `SWEEP_MOST` counters filed under an hour that has passed and drops
        those whose period has ended; returns how many it dropped. Called from the charges
        themselves, once a `SWEEP_EVERY_S`. A rolling counter charged on is filed again under
        each later hour: its stale entries count toward the bound too (a sweep that looked at
        every busy key's held the event loop 35 ms per 100,000 keys)."""
        dropped = looked = 0
        for hour in sorted(h for h in self._ending if (h + 1) * 3600 <= now):
            keys = self._ending[hour]
            while keys and looked < SWEEP_MOST:
                key = keys.pop()
                looked += 1
                end = self._ends.get(key)
                if end is not None and end <= now:  # else it was charged again since: kept
                    del self._ends[key]
                    self._cal.pop(key, None)
                    self._rolling.pop(key, None)
                    dropped += 1
                    self._dropped += 1
            if keys:
                break
            del self._ending[hour]
        if self._dropped * 2 > len(self._order):  # `to_follow`'s turns: a turn under way skips a few, once
            self._order = [*self._cal, *(k for k in self._rolling if k not in self._cal)]
            self._dropped = 0
        more = any((h + 1) * 3600 <= now for h in self._ending)
        self._swept_at, self._next_sweep = now, now + (1.0 if more else SWEEP_EVERY_S)
        return dropped

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

    def add_read_back(self, store_key: str, amount: int, slot: int = -1, period: Period | None = None) -> None:
        """Adds spend read back from the ledger to a counter (a rolling window's `slot`); its
        `period` when the caller knows it (else the end is read from the key's name)."""
        if store_key not in self._cal and store_key not in self._rolling:
            self._order.append(store_key)
        if slot >= 0:
            slots = self._rolling.setdefault(store_key, {})
            slots[slot] = slots.get(slot, 0) + amount
        else:
            self._cal[store_key] = self._cal.get(store_key, 0) + amount
        if period is not None:
            self._keep_until(store_key, counter_end(period))
        elif store_key not in self._ends or slot >= 0:
            self._keep_until(store_key, _end_of_key(store_key, slot, self._clock()))

    def raise_read_back(self, store_key: str, amount: int, slot: int = -1) -> None:
        """Raises a counter (a rolling window's `slot`) to `amount` read back from the ledger, where lower."""
        have = self._rolling.get(store_key, {}).get(slot, 0) if slot >= 0 else self._cal.get(store_key, 0)
        if amount > have:
            self.add_read_back(store_key, amount - have, slot)

    def to_follow(self, start: int, most: int) -> tuple[list[str], list[str], int]:
        """Up to `most` counters from the `start`-th: calendar ones and rolling windows, and where
        the next call starts (0 after the last)."""
        picked = self._order[start : start + most]
        cal = [k for k in picked if k in self._cal]
        rolling = [k for k in picked if k in self._rolling] if self._rolling else []
        return cal, rolling, start + most if start + most < len(self._order) else 0

    def follow(self, cal: dict[str, int], rolling: dict[str, dict[int, int]]) -> None:
        """Sets counters this process holds to what the shared store holds (read by the caller):
        up or down, since the shared store is where admission counted them (a give-back this
        process applied before Redis did is back within a second, at the next read)."""
        for key, amount in cal.items():
            if key in self._cal:
                self._cal[key] = amount
        for key, slots in rolling.items():
            if key in self._rolling:
                self._rolling[key] = dict(slots)

    def counters(self) -> dict[str, int]:
        """Every counter: store key -> nano-USD used (a rolling window's slots summed, stale ones too)."""
        out = dict(self._cal)
        for k, slots in self._rolling.items():
            out[k] = sum(slots.values())
        return out
