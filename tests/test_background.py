"""Background threads (the span builder; the ledger's writer at `writer_priority: low`) run at a
lower CPU priority than the event loop's thread."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from edgeroute.background import NICE, lower_priority
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")


def _nice(tid: int) -> int:
    # /proc/<pid>/task/<tid>/stat: field 19 is the nice value (after the command name in parentheses).
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_a_thread_that_lowers_its_priority_leaves_the_others_alone() -> None:
    seen: list[int] = []

    def run() -> None:
        lower_priority()
        seen.append(_nice(threading.get_native_id()))

    before = _nice(threading.get_native_id())
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [min(19, before + NICE)]
    assert _nice(threading.get_native_id()) == before  # the calling (loop) thread is unchanged


def test_the_ledgers_writer_runs_below_the_loop(tmp_path: Path) -> None:
    ledger = Ledger(SqliteBackend(str(tmp_path / "spend.db")), flush_interval=0.05, low_priority=True)
    try:
        writer = ledger._thread  # its own: another test's ledger may have left one of that name
        assert writer.native_id is not None
        for _ in range(100):
            if _nice(writer.native_id) > _nice(threading.get_native_id()):
                break
            threading.Event().wait(0.01)
        assert _nice(writer.native_id) == min(19, _nice(threading.get_native_id()) + NICE)
    finally:
        ledger.close()
