"""Budget `notify` thresholds: a log line and an optional webhook, once per budget, subject,
period and threshold, when a request settles and the budget's spend passes the threshold.
Spend is the counter less what this process holds reserved for requests in flight: told at
admission, by the reservation (a request's worst case), a budget small beside its requests'
worst case was told "50 % reached" at 3 % spent, and, told once a period, never when it was.
Once across instances (marked in the shared store when there is one) and
across restarts (each threshold told is written to the ledger with its batches and read back
at start: a process remembered only its own, so a restart told every one again).

A calendar period's mark names the period, so it is told once in it. A rolling window's mark
names only its slot size, the same for ever: it is in force for one window from its telling
(it was told once in a process's life, and read back after a restart for 31 days)."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson

from edgeroute import secrets
from edgeroute.config import Budget
from edgeroute.cost import budgets as B
from edgeroute.cost.control.stores import Stores
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import Backend
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.requestlog.outcomes import BUDGET_NOTICES

log = logging.getLogger("edgeroute.cost")
MONTH_S = 31 * 86400  # the longest calendar period


def _in_force(mark: str, told: float, rolling: dict[str, Budget], now: float) -> float:
    """Until when a mark told at `told` holds: one window for a rolling budget's current
    mark, else a month, the longest period (a calendar mark names its period, over by then;
    so `_notify`'s trim can drop it, as it drops the marks this process told)."""
    for prefix, b in rolling.items():
        if mark.startswith(prefix) and mark.rsplit(":", 2)[-2] == B.period_of(b, now).id:
            return told + 3600 * (b.window_hours or 0)
    return told + MONTH_S


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Notifications(Stores):
    """Threshold notifications (a part of `CostControl`)."""

    _any_notify: bool
    _notified: dict[str, float]  # threshold told (by this process, or before its start) -> in force until
    reserved: dict[str, int]  # this process's reservations not yet settled (`Settlement`)
    _session: aiohttp.ClientSession | None  # for webhooks, opened on the first
    ledger: Ledger | None  # where a threshold told is recorded (see `ReadBack`)

    def told_before(self, db: Backend, budgets: list[Budget], now: float) -> None:
        """Before serving (blocking): the thresholds the ledger says were told in a period
        still running (by this server before a restart, or by another instance) are not
        told again."""
        longest = max([MONTH_S] + [3600 * (b.window_hours or 0) for b in budgets])
        rolling = {f"{b.name}:": b for b in budgets if b.period == "rolling"}
        rows = db.query(f"SELECT mark, ts FROM {BUDGET_NOTICES} WHERE ts >= ?", (now - longest,))
        for mark, ts in rows:
            until = _in_force(str(mark), float(ts), rolling, now)
            if until > now:
                self._notified[str(mark)] = max(until, self._notified.get(str(mark), 0.0))

    def _settled(self, charges: list[B.Charge]) -> None:
        if not self._any_notify:
            return
        # The counters (this process's, following the shared store's at each reservation) less
        # the requests still in flight here: spent, as near as this process knows. With other
        # instances, theirs in flight may count until they settle.
        spent = [self.local_budgets.used(c) - self.reserved.get(c.store_key, 0) for c in charges]
        self._notify(charges, spent)

    def _notify(self, charges: list[B.Charge], spent: list[int]) -> None:
        now = time.time()
        for c, used in zip(charges, spent, strict=True):
            a = B.crossed(c.budget, used, "notify")
            if a is None:
                continue
            mark = f"{c.store_key}:{a.at_percent}"
            if self._notified.get(mark, 0.0) > now:
                continue
            if len(self._notified) > 10_000:  # marks of past periods and windows
                self._notified = {m: t for m, t in self._notified.items() if t > now}
            rolling = c.period.rolling
            self._notified[mark] = now + c.period.slot_s * B.ROLLING_SLOTS if rolling else c.period.resets_at
            event = {
                "event": "budget_threshold",
                "budget": c.budget.name,
                "scope": c.budget.scope,
                "subject": c.subject,
                "period": c.period.id,
                "threshold_percent": a.at_percent,
                "used_usd": round(used / B.NANO, 6),
                "limit_usd": c.budget.limit_usd,
                "resets_at": iso(c.period.resets_at),
            }
            ttl_s = int(c.period.slot_s * B.ROLLING_SLOTS) if rolling else c.period.ttl_s
            self._spawn(self._send(mark, max(1, ttl_s), a.webhook, event))

    async def _send(self, mark: str, ttl_s: int, url: str | None, event: dict[str, Any]) -> None:
        if self.shared is not None and self.shared_up():
            try:
                if not await self.shared.mark_once(mark, ttl_s):
                    return  # another instance has told already
            except StoreUnavailable:
                pass
        if self.ledger is not None:  # read back at start: a restart does not tell it again
            self.ledger.outcome(BUDGET_NOTICES, (mark, time.time()))
        log.warning(
            "budget %s for %s %s reached %s%% ($%.4f of $%.2f)",
            event["budget"], event["scope"], event["subject"], event["threshold_percent"],
            event["used_usd"], event["limit_usd"],
        )  # fmt: skip
        if url is None:
            return
        try:
            url = secrets.resolve(url).reveal()  # a reference is read when used: rotated, it applies
        except secrets.SecretError as e:
            log.warning("budget webhook failed: %s", e)  # names the reference, never a value
            return
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            # Never followed (as alert webhooks): a 307 would carry the event to a host the config never named.
            body, hdrs = orjson.dumps(event), {"Content-Type": "application/json"}
            async with self._session.post(url, data=body, headers=hdrs, allow_redirects=False) as r:
                if r.status >= 300:
                    log.warning("budget webhook failed: HTTP %s", r.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("budget webhook failed: %s", type(e).__name__)
