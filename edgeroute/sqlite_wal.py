"""Opening a SQLite file in WAL mode when other processes have it open too.

Several workers (or a restarted one) open the same ledger, key store and shared-state
files. Switching a file to WAL needs a lock that the busy timeout does not always wait
for (a writer mid-transaction, or a recovery after a worker was killed): SQLite answers
"database is locked" at once. A start-up that met that would fail the worker, so the
mode is set only when the file is not in WAL yet, and a locked attempt is retried for a
bounded time.

A file it creates is readable by its owner alone (0600; SQLite gives its `-wal` and `-shm`
files the database's mode): a ledger holds the request log's prompts and answers where
`log_content` keeps them, a key store the audit log and config versions.

The WAL stays bounded with several writers (`checkpoint`): SQLite writes the WAL from its
start again only when a transaction begins with every frame copied into the database and no
reader left in the WAL, which two workers' interleaved batches rarely leave it; and without
`journal_size_limit` a WAL started over keeps the size of its longest run on disk.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

RETRY_FOR_S = 10.0
# A WAL started over is cut back to this at its first commit (`journal_size_limit`, which is
# the connection's own: every writer of a shared file sets it, as whichever starts the WAL
# over cuts it). Kept rather than cut to nothing: the next batches reuse its blocks.
WAL_KEEP_BYTES = 4 * 1024 * 1024
# Frames (4 KiB pages) past which `checkpoint` makes sure the WAL is started over.
RESTART_FRAMES = 1024
# How long that checkpoint waits for another process's writer and for readers of an old
# snapshot (SQLite's busy handler) before it gives up until the next batch. It holds the
# write lock while it waits for readers, so every writer waits with it: short, and a writer
# mid-batch (tens of ms) is let be rather than waited for.
RESTART_WAIT_MS = 20


def connect(path: str | Path, synchronous: str = "NORMAL", **options: Any) -> sqlite3.Connection:
    """A connection to `path` in WAL mode (`options` go to `sqlite3.connect`)."""
    private(path)
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        conn: sqlite3.Connection = sqlite3.connect(path, **options)
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Copies the WAL's committed frames into the database as far as readers allow, waiting
    for nobody (PASSIVE); once the WAL is `RESTART_FRAMES` long, then also RESTART: waits up
    to `RESTART_WAIT_MS` for the write lock and for readers to leave the WAL, so that the next
    transaction, whichever process's, starts the WAL over (and cuts the file back). Busy
    (a writer mid-batch, a reader holding an old snapshot) is no error: the WAL waits for the
    next call. Returns SQLite's row: (busy, frames in the WAL, frames copied)."""
    # PASSIVE first: the copy and its fsyncs (tens of ms on a busy disk) hold no lock; the
    # RESTART after it holds the write lock with little left to copy.
    row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if row[1] < RESTART_FRAMES:
        return int(row[0]), int(row[1]), int(row[2])
    wait_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
    try:
        row = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout={wait_ms}")
    return int(row[0]), int(row[1]), int(row[2])


def private(path: str | Path) -> None:
    """Creates `path` with mode 0600 if it does not exist (a file there keeps its mode: the
    operator's); not for `:memory:` or a `file:` URI."""
    name = str(path)
    if name == ":memory:" or name.startswith("file:") or not name:
        return
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:  # there already, or no such directory: SQLite says so in its own words
        pass


PROGRESS_STEPS = 1000  # VM steps between deadline checks (well under a millisecond)


def read_until(path: str | Path, sql: str, params: Any, end: float) -> list[tuple[Any, ...]]:
    """`sql`'s rows on a read-only connection of its own (WAL: it takes no writer's lock, and no
    lock of the caller's), stopped at `end` (monotonic) with TimeoutError: a slow scan frees its
    thread and its snapshot at its deadline, not when it would have ended."""
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=min(10.0, left), isolation_level=None)
    try:
        # A non-zero return aborts the statement ("interrupted"): the deadline has passed.
        conn.set_progress_handler(lambda: int(time.monotonic() > end), PROGRESS_STEPS)
        try:
            return list(conn.execute(sql, tuple(params)).fetchall())
        except sqlite3.OperationalError as e:
            # Stopped by the handler, or still locked out (busy) when the deadline came.
            if "interrupt" in str(e) or time.monotonic() >= end:
                raise TimeoutError from None
            raise
    finally:
        conn.close()
