"""`bench.hit_instructions` reads callgrind's per-thread files into instructions a hit."""

from __future__ import annotations

from pathlib import Path

from edgeroute.bench.hit_instructions import per_thread


def test_per_thread_counts_each_threads_totals_per_hit(tmp_path: Path) -> None:
    (tmp_path / "callgrind.out.41").write_text("totals: 999\n")  # the process's own summary file: not a thread
    (tmp_path / "callgrind.out.41-01").write_text("events: Ir\nsummary: 2000000\ntotals: 2000000\n")
    (tmp_path / "callgrind.out.41-02").write_text("events: Ir\ntotals: 800000\n")
    (tmp_path / "callgrind.out.41-03").write_text("events: Ir\ntotals: 0\n")  # a thread that never ran while counted
    assert per_thread(tmp_path, 400) == {1: 5000.0, 2: 2000.0}
