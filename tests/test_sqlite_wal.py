"""Opening a shared SQLite file while another process holds its lock: a worker's start-up
must wait for it, not fail (a failed start stops the whole server)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from edgeroute import sqlite_wal


def test_a_file_locked_by_another_connection_is_opened_once_the_lock_is_released(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # locked exclusively below
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO t VALUES (1)")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    t0 = time.monotonic()
    conn = sqlite_wal.connect(path, timeout=0.01, check_same_thread=False)  # a busy timeout shorter than the lock
    assert time.monotonic() - t0 >= 0.25
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    conn.close()
    holder.close()


def test_a_file_already_in_wal_is_not_switched_again(tmp_path: Path) -> None:
    path = tmp_path / "wal.db"
    first = sqlite_wal.connect(path)
    first.execute("CREATE TABLE t (x INTEGER)")
    first.execute("BEGIN IMMEDIATE")  # a writer mid-transaction
    second = sqlite_wal.connect(path, timeout=0.01)  # readers and a second writer's open need no switch
    assert second.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    first.rollback()
    first.close()
    second.close()
