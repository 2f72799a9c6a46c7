"""A rolling budget's `notify` threshold is told once a window, not once a process.

The thresholds told were remembered by a mark naming the budget, subject and period: a
rolling window's "period" names only its slot size, the same for ever, so a process told a
rolling budget's threshold once in its life (a 24-hour budget crossing 80 % again the next
week went unheard), and a restart read back every mark of the last 31 days as still told. A
rolling threshold is now told again once a window has passed since it was told, in the
process and after a restart (its mark's time is the last telling's)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import eventually
from tests.test_cost_restart import Served

WINDOW_H = 0.002  # 7.2 s
TWO_CENTS = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.02}


def _config(upstream: str, db: Path, hook: str) -> dict[str, Any]:
    told = [{"at_percent": 5, "action": "notify", "webhook": hook}]
    limit = {"name": "roll", "scope": "global", "limit_usd": 1.0, "period": "rolling", "window_hours": WINDOW_H}
    return {
        "providers": {"a": {"base_url": upstream, "api_key": "k"}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": TWO_CENTS}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {"limits": [{**limit, "actions": told}]},
    }


async def _ask(url: str, n: int) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        for _ in range(n):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)


async def _true(value: bool) -> bool:
    return value


async def _window_passed(since: float) -> None:
    # a rolling window is a span of time: nothing but the clock ends it
    await eventually(lambda: _true(time.time() > since + WINDOW_H * 3600 + 0.5), "the window to pass", within=30)


def _marks(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM budget_notices").fetchone()[0])


async def test_told_again_once_the_window_has_passed(start_upstream, start_proxy, tmp_path: Path, hook) -> None:
    url, got = hook
    up = await start_upstream()
    proxy = await start_proxy(_config(up.base_url, tmp_path / "l.db", url))
    await _ask(proxy.url, 3)  # $0.06 of $1 in the window: past 5 %
    await eventually(lambda: _true(len(got) == 1), "the first notice")
    told = time.time()
    await _ask(proxy.url, 2)  # still past 5 % in the same window: not told again
    await _window_passed(told)
    await _ask(proxy.url, 3)  # the window's spend crosses 5 % again
    await eventually(lambda: _true(len(got) == 2), "the notice of the later window")
    assert [e["threshold_percent"] for e in got] == [5, 5]


async def test_a_restart_after_the_window_tells_it_again(start_upstream, tmp_path: Path, hook) -> None:
    url, got = hook
    up = await start_upstream()
    db, path = tmp_path / "l.db", tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(_config(up.base_url, db, url)))
    first = await Served.start(path)
    try:
        await _ask(first.url, 3)
        await eventually(lambda: _true(len(got) == 1), "the first notice")
        told = time.time()
        await eventually(lambda: _true(_marks(db) == 1), "the notice in the ledger")
    finally:
        first.kill()
    within = await Served.start(path)  # restarted within the window: told already
    try:
        await _ask(within.url, 3)
    finally:
        within.kill()
    await _window_passed(told)
    later = await Served.start(path)  # restarted after it: the mark read back is no longer in force
    try:
        await _ask(later.url, 3)
        await eventually(lambda: _true(len(got) == 2), "the notice after the window")
    finally:
        later.kill()
    assert [e["threshold_percent"] for e in got] == [5, 5]
