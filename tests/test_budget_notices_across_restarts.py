"""A budget's `notify` threshold is told once a period, whatever restarts in between.

Each process remembered which thresholds it had told in memory (and, with Redis or
`--workers`, marked them in the shared store, which a restarted `serve --workers` does not
keep): after a restart (a deploy, a crash) the first request of the period past a threshold
sent its webhook again, so on-call heard "50% of the month's budget" at every deploy. The
thresholds told are now written to the ledger with its batches and read back at start with
the spend.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.conftest import eventually
from tests.test_cost_restart import Served

TWO_CENTS = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.02}


def _config(upstream: str, db: Path, hook: str) -> dict[str, Any]:
    told = [{"at_percent": p, "action": "notify", "webhook": hook} for p in (5, 10)]
    return {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": TWO_CENTS}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "day", "scope": "global", "limit_usd": 1.0, "period": "day", "actions": told}]},
    }


async def _ask(url: str, n: int) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        for _ in range(n):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)


def _stop(served: Served, how: signal.Signals) -> None:
    served.proc.send_signal(how)
    served.proc.wait(30)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
async def test_a_threshold_told_before_a_restart_is_not_told_again(
    start_upstream: Any, tmp_path: Path, how: signal.Signals, hook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, got = hook
    up = await start_upstream()
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(_config(up.base_url, tmp_path / "l.db", url)))
    first = await Served.start(path)
    try:
        await _ask(first.url, 3)  # $0.06 of $1: past 5%
        await eventually(lambda: _async(len(got) == 1), "the 5% notice")
        # A hard kill loses the ledger's last flush interval: wait until the third request is
        # written (its notice was queued as it settled, with its record).
        ledger = tmp_path / "l.db"
        await eventually(lambda: _async(_spend_rows(ledger) == 3), "the three requests in the ledger")
    finally:
        _stop(first, how)
    second = await Served.start(path)
    try:
        await _ask(second.url, 1)  # $0.08: past 5% still, not 10%
        await _ask(second.url, 1)  # $0.10: past 10%
        await eventually(lambda: _async(any(e["threshold_percent"] == 10 for e in got)), "the 10% notice")
    finally:
        _stop(second, signal.SIGTERM)
    assert sorted(e["threshold_percent"] for e in got) == [5, 10], got
    assert all(e["budget"] == "day" and e["subject"] == "*" for e in got)


async def _async(value: bool) -> bool:
    return value


def _spend_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM spend").fetchone()[0])
