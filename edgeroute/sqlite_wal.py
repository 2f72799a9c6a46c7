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
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

RETRY_FOR_S = 10.0


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
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


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
