"""`serve --workers 2` without Redis: a client that hangs up while its budget reservation waits
on the workers' file takes nothing from the budget (red3M F1). The file commits the reservation
in its thread whatever the handler does; it stayed counted as spent until the period ended."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.scale.support import Instance, Spawn
from tests.test_budget_abandoned_redis import RESERVATION_USD, abandon, admitted, budget_config, counter_follows_ledger


async def test_workers_give_back_reservations_whose_clients_left_during_admission(
    spawn: Spawn, start_upstream: Any, tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = short_tmp / "run"
    run.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))  # where the supervisor puts the workers' file
    up = await start_upstream(reply_words=5)
    ledger = tmp_path / "ledger.db"
    inst: Instance = await spawn(budget_config(up.base_url, ledger), "--workers", "2")
    (shared,) = run.glob("edgeroute-workers-*/shared.db")
    # The workers' file locked by another writer: every reservation waits on it (in its thread)
    # while its client hangs up; they all commit once the lock goes.
    holder = sqlite3.connect(shared, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await abandon(inst.url, 8, after_s=0.5)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    counted = await counter_follows_ledger(inst.url, ledger)
    assert counted < RESERVATION_USD / 2, counted  # nothing was spent; nothing stays reserved
    # Alice's $1 holds its five requests of up to $0.20; the abandoned ones had filled it.
    assert await admitted(inst.url, 4) == [200] * 4
