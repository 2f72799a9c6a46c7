"""The workers' shared SQLite files: opening one while another process holds its lock (a
worker's start-up must wait for it, not fail: a failed start stops the whole server), and
their WAL staying a few MB long when several connections write them (as `serve --workers N`
does, one connection a worker), cut back on disk once started over."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeroute import sqlite_wal
from edgeroute.cost.ledger_store import Batch, SqliteBackend


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


ROWS = 256  # a batch: about 1 MB of WAL (a request's spend row with a 3 KB route name)
ROUTE = "r" * 3000


def _batch(writer: str, n: int) -> Batch:
    rows = [
        (f"{writer}-{n}-{i}", time.time(), "2026-12-06", None, "t", None, "m", ROUTE, None, "d", 0, 200, "ok",
         None, 10, 5, 0, 0, 0.001, 0.001, 1.0, 1, f"{writer}-{n}-{i}")
        for i in range(ROWS)
    ]  # fmt: skip
    return Batch(f"{writer}-{n}", rows, [])


def _wal_bytes(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return 0


def _spend_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM spend").fetchone()[0])
    finally:
        conn.close()


def _held(in_tx: threading.Event, go: threading.Event) -> Callable[[], None]:
    """A `rest` for b's batch: at its first, b's transaction (holding the write lock) waits for
    `go`, and a while after it."""

    def rest() -> None:
        if not in_tx.is_set():
            in_tx.set()
            go.wait(10)
            time.sleep(0.02)

    return rest


def test_two_writers_whose_batches_overlap_keep_the_wal_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker b's batch is mid-transaction whenever worker a checkpoints (as two workers' writers,
    each writing in slices with rests, mostly are at full load): a's checkpoint copies only what
    was committed, so every batch of a began with b's last frames not copied yet, and SQLite never
    started the WAL over: it grew by both batches every round (28 MB over these rounds; 14-38 MB
    after a minute of `serve --workers 2` at full load, never cut back). Now a long WAL gets a
    RESTART checkpoint, which waits for b's commit, and the next batch starts the WAL over and
    cuts the file back."""
    monkeypatch.setattr(sqlite_wal, "RESTART_WAIT_MS", 10_000)  # a stalled host still sees b commit
    db = tmp_path / "l.db"
    a, b = SqliteBackend(db), SqliteBackend(db)
    rounds, peak = 12, 0
    for n in range(rounds):
        a.write(_batch("a", n))
        in_tx, checkpointing = threading.Event(), threading.Event()
        other = threading.Thread(target=b.write, args=(_batch("b", n), _held(in_tx, checkpointing)))
        other.start()
        assert in_tx.wait(10)
        checkpointing.set()
        a.checkpoint()
        other.join(10)
        peak = max(peak, _wal_bytes(db))
    a.close()
    b.close()
    assert _spend_rows(db) == 2 * rounds * ROWS  # nothing written was lost
    # `RESTART_FRAMES` (4 MiB) and the round that passed them, then cut back
    assert peak < sqlite_wal.WAL_KEEP_BYTES + 4 * 1024 * 1024, f"the WAL reached {peak / 1e6:.1f} MB"


def test_a_reader_holding_a_snapshot_is_no_error_and_the_wal_is_cut_back_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A report holding one snapshot (`Backend.snapshot`) keeps every frame after it in the WAL:
    the checkpoint copies what it may and says busy, which is no error (nothing logged, every
    batch written). Once the reader is gone, the WAL starts over and its file is cut back to
    `WAL_KEEP_BYTES` (it kept the longest run's size on disk, 16 MB here, for as long as the server ran)."""
    db = tmp_path / "l.db"
    a, b = SqliteBackend(db), SqliteBackend(db)
    with caplog.at_level(logging.WARNING, logger="edgeroute.ledger"):
        a.write(_batch("a", -1))
        with a.snapshot() as reader:
            assert reader.query("SELECT COUNT(*) FROM spend", ())[0][0] == ROWS
            for n in range(6):
                a.write(_batch("a", n))
                b.write(_batch("b", n))
                a.checkpoint()
                b.checkpoint()
            held = _wal_bytes(db)
            assert reader.query("SELECT COUNT(*) FROM spend", ())[0][0] == ROWS  # its snapshot, whole
        for n in range(6, 9):
            a.write(_batch("a", n))
            a.checkpoint()
            b.write(_batch("b", n))
            b.checkpoint()
    after = _wal_bytes(db)
    a.close()
    b.close()
    assert not caplog.records
    assert _spend_rows(db) == (1 + 2 * 9) * ROWS
    assert held > 3 * sqlite_wal.WAL_KEEP_BYTES  # the reader held the WAL long
    assert after <= sqlite_wal.WAL_KEEP_BYTES + 2 * 1024 * 1024, f"the WAL file stayed {after / 1e6:.1f} MB"
