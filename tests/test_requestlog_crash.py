"""A crash loses at most one flush interval: a writer process recording steadily (the real
ledger writer, SQLite, records shaped like real traffic) is killed with SIGKILL mid-load,
and every record it had recorded more than one interval before is in the database, in the
spend ledger and the request log alike. And the arithmetic that paces the writer."""

from __future__ import annotations

import pytest

from edgeroute.bench import requestlog as bench
from edgeroute.cost.writer_pace import MIN_WAKE_ROWS, WriterPace


def test_sigkill_mid_load_loses_at_most_one_flush_interval() -> None:
    # 2,500/s rather than the benchmark's 5,000/s, and the writer at normal priority
    # (`ledger.writer_priority: normal`): the suite shares the machine with other processes,
    # which starve a low-priority writer; what is checked here is the writer's pacing, not
    # the machine's speed (`bench requestlog crash`).
    r = bench.crash(rate=2500, flush=0.5, kill_after=2.5, slack=0.1, low_priority=False)
    print(f"\nSIGKILL after {r.fed} records: {r.lost} lost = {r.lost_intervals:.2f} intervals")
    assert r.fed > 2500, "killed mid-load"
    assert r.old > 0 and r.old_missing == 0, "a record older than one interval was lost"
    assert r.not_a_prefix == 0, "batches are committed in order"
    assert r.log_rows == r.stored, "the request log is written in the spend ledger's transactions"


def test_the_period_leaves_room_for_the_write() -> None:
    pace = WriterPace(0.5)
    assert pace.period_s == 0.25 and pace.wake_rows > 10**9  # nothing measured yet
    pace.cycle(taken=1000, over_s=0.2, took_s=0.1)  # 5,000/s; 100 us a record
    # period + 2 * (its records' write time) fits in one interval
    assert pace.period_s + 2 * pace.rate * pace.period_s * pace.per_record_s == pytest.approx(0.5)
    assert pace.period_s < 0.5 - 0.1
    fast = pace.period_s
    pace.cycle(taken=1000, over_s=0.2, took_s=0.3)  # a slow write: shorter periods
    assert pace.period_s < fast
    slow = pace.period_s
    for _ in range(30):  # the slow write is forgotten over a few cycles
        pace.cycle(taken=1000, over_s=0.2, took_s=0.1)
    assert slow < pace.period_s == pytest.approx(fast)


def test_a_burst_wakes_the_writer_and_idle_time_does_not() -> None:
    pace = WriterPace(0.5)
    pace.cycle(taken=500, over_s=0.25, took_s=0.02)  # 2,000/s
    assert pace.wake_rows == int(2 * 2000 * pace.period_s)  # twice the expected batch
    pace.cycle(taken=0, over_s=0.5, took_s=0.001)  # idle
    assert pace.wake_rows == MIN_WAKE_ROWS and pace.period_s == pytest.approx(0.5, rel=0.01)
