"""A managed key's budget first seen after start
(`CostControl._count_key_budget`) reads the month so far back from the ledger once, right
away. Two ways spend escapes it: requests of the key still running when the budget is first
seen (not in the ledger yet, and admitted without the budget, so never charged), and a budget
taken off and given back (the name was counted once: the spend in between is never read).
Real `edgeroute serve`, the openai SDK as client, $0.01 a request, no Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.governance_support import call
from tests.test_cost_restart import Served
from tests.test_key_budgets import ADMIN, _admitted, _config, _key


async def _patch(url: str, key_id: str, budget: float | None) -> None:
    status, body = await call("PATCH", url + f"/admin/keys/{key_id}", ADMIN, json={"budget_usd": budget})
    assert status == 200, body


async def test_requests_running_when_a_key_gets_a_budget_count_against_it(start_upstream: Any, tmp_path: Path) -> None:
    """Three requests of 1.5 s are running when the key is given $0.05: with them and the
    first request seen with the budget, one more fits, not four. (The ledger is read as the
    budget is first seen, before the three are written; a reloaded config budget waits for
    the previous generation's requests instead, `state.retiring`.)"""
    up = await start_upstream(latency_ms=1500)
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        key = await _key(served.url, ADMIN)
        running = asyncio.gather(*(_admitted(served.url, key["secret"], 1) for _ in range(3)))
        await asyncio.sleep(0.2)  # admitted, without a budget
        await _patch(served.url, key["id"], 0.05)
        await asyncio.sleep(0.5)  # the key poll sees it
        assert await _admitted(served.url, key["secret"], 1) == 1  # the budget first seen
        assert sum(await running) == 3
        await asyncio.sleep(0.5)  # all written to the ledger
        assert await _admitted(served.url, key["secret"], 4) == 1, "the requests running at the change were not counted"
    finally:
        served.kill()


async def test_a_budget_taken_off_and_given_back_counts_the_spend_in_between(
    start_upstream: Any, tmp_path: Path
) -> None:
    """$0.05, one request; the budget taken off, three more; $0.05 again: the month so far is
    $0.04 as when a budget is first given (test_key_budgets.py), so one more fits, not four."""
    up = await start_upstream()
    served = await Served.start(_config(up.base_url, tmp_path))
    try:
        key = await _key(served.url, ADMIN, budget_usd=0.05)
        assert await _admitted(served.url, key["secret"], 1) == 1
        await _patch(served.url, key["id"], None)
        await asyncio.sleep(0.5)
        assert await _admitted(served.url, key["secret"], 3) == 3
        await asyncio.sleep(0.3)
        await _patch(served.url, key["id"], 0.05)
        await asyncio.sleep(0.5)
        assert await _admitted(served.url, key["secret"], 1) == 1
        await asyncio.sleep(0.3)
        assert await _admitted(served.url, key["secret"], 4) == 0, "the $0.03 spent without the budget was forgotten"
    finally:
        served.kill()
