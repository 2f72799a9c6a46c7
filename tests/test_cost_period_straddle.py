"""A request that starts before a budget period's end and is admitted after it (a long prompt
counted first, a slow Redis round trip) was reserved and settled in the new period, by its
admission's time, while the ledger booked it in the old one, by its start. The budget then
said one thing while the proxy ran and another after a restart or a Redis reseed (both read
the period back from the ledger): the request vanished from the period it was counted in.
Its charges now go in the periods of its start, where the ledger books it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.admission import ADMISSION
from edgeroute.config import Budget, parse
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.control.ticket import CostTicket
from edgeroute.cost.keys import ANONYMOUS
from tests.test_cost_abandoned_attempts import _rows
from tests.test_cost_support import REDIS_URL, cost_proxy, require_redis

CENT = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.01}  # every request costs $0.01


def _noon_offset(now: float) -> int:
    """A UTC offset (minutes) at which `now` is near local noon: the day's edges are hours away."""
    minute = int(now // 60) % 1440
    return (12 * 60 - minute + 720) % 1440 - 720


async def _spent(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/budgets") as r:
        return float((await r.json())["budgets"][0]["spent_usd"])


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_a_request_admitted_after_its_periods_end_is_counted_where_the_ledger_books_it(
    start_upstream: Any, tmp_path: Path, store: str
) -> None:
    up = await start_upstream()
    db = tmp_path / "l.db"
    budget = {"name": "day", "scope": "global", "limit_usd": 1.0, "period": "day",
              "utc_offset_minutes": _noon_offset(time.time())}  # fmt: skip
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {"limits": [budget]},
    }
    if store == "redis":
        import redis

        require_redis()
        redis.Redis.from_url(REDIS_URL).flushdb()
        cfg["shared_state"] = {"redis_url": REDIS_URL}
    today = B.period_of(Budget.model_validate(budget), time.time())
    async with cost_proxy(cfg) as proxy:
        control = proxy.app[ADMISSION]
        assert isinstance(control, CostControl)
        # Admitted a second after the day ends (its start is now, in the day): the admission's clock.
        control.clock = lambda: today.resets_at + 1.0
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
            for _ in range(3):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        running = await _spent(proxy.url)
    (booked,) = _rows(db, "SELECT SUM(cost_usd) FROM spend")[0]
    assert booked == pytest.approx(0.03)  # the ledger books them by their start: today
    if store == "redis":
        redis.Redis.from_url(REDIS_URL).flushdb()  # Redis restarted empty: reseeded from the ledger
    async with cost_proxy(cfg) as proxy:
        if store == "redis":  # the first admission that finds Redis empty reads the ledger back
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            after = await _spent(proxy.url) - 0.01
        else:
            after = await _spent(proxy.url)
    # Counted today while running, read back today after the restart: the same spend.
    assert running == pytest.approx(0.03) and after == pytest.approx(running)


@pytest.mark.parametrize("period", [{"period": "day"}, {"period": "rolling", "window_hours": 1}])
def test_requests_admitted_out_of_order_are_each_charged_in_their_starts_period(period: dict[str, Any]) -> None:
    """Admission keeps the period it last computed: one begun just before its end and admitted
    after one begun in the next period was charged in the next period too."""
    budget = {"name": "b", "scope": "global", "limit_usd": 1.0, **period}
    cfg = parse(
        {
            "providers": {"a": {"base_url": "http://127.0.0.1:9"}},
            "deployments": {"d": {"provider": "a", "model": "x", "price": CENT}},
            "models": {"m": {"deployments": ["d"]}},
            "budgets": {"limits": [budget]},
        },
        "t.yaml",
    )
    control = CostControl(cfg)
    b = cfg.budgets.limits[0]
    now = time.time()
    p = B.period_of(b, now)
    edge = p.slot * p.slot_s + p.slot_s if p.rolling else p.resets_at  # the end of `now`'s slot or day
    later, earlier = B.period_of(b, edge + 1), B.period_of(b, edge - 1)
    for started, expected in ((edge + 1, later), (edge - 1, earlier)):  # admitted in this order
        (charge,) = control._charges(CostTicket(ANONYMOUS, started=started), "m", 1, now)
        assert (charge.period.id, charge.period.slot) == (expected.id, expected.slot)
