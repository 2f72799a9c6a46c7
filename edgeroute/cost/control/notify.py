"""Budget `notify` thresholds: a log line and an optional webhook, once per budget, subject,
period and threshold across instances (marked in the shared store when there is one) and
across restarts (each threshold told is written to the ledger with its batches and read back
at start: a process remembered only its own, so a restart told every one again)."""

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


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Notifications(Stores):
    """Threshold notifications (a part of `CostControl`)."""

    _notified: set[str]  # thresholds told by this process or, this period, before its start
    _session: aiohttp.ClientSession | None  # for webhooks, opened on the first
    ledger: Ledger | None  # where a threshold told is recorded (see `ReadBack`)

    def told_before(self, db: Backend, budgets: list[Budget], now: float) -> None:
        """Before serving (blocking): the thresholds the ledger says were told in a period
        still running (by this server before a restart, or by another instance) are not
        told again."""
        longest = max([MONTH_S] + [3600 * (b.window_hours or 0) for b in budgets])
        rows = db.query(f"SELECT mark FROM {BUDGET_NOTICES} WHERE ts >= ?", (now - longest,))
        self._notified.update(str(r[0]) for r in rows)

    def _notify(self, charges: list[B.Charge], used_before: list[int]) -> None:
        for c, used in zip(charges, used_before, strict=True):
            a = B.crossed(c.budget, used + c.amount, "notify")
            if a is None:
                continue
            mark = f"{c.store_key}:{a.at_percent}"
            if mark in self._notified:
                continue
            self._notified.add(mark)
            event = {
                "event": "budget_threshold",
                "budget": c.budget.name,
                "scope": c.budget.scope,
                "subject": c.subject,
                "period": c.period.id,
                "threshold_percent": a.at_percent,
                "used_usd": round((used + c.amount) / B.NANO, 6),
                "limit_usd": c.budget.limit_usd,
                "resets_at": iso(c.period.resets_at),
            }
            self._spawn(self._send(mark, c.period.ttl_s, a.webhook, event))

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
