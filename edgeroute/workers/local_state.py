"""Budgets, reservations and rate-limit buckets shared by the workers of one machine, in SQLite.

`serve --workers N` without `shared_state` keeps what must be one for the whole server in
a SQLite file (WAL) in the supervisor's run directory. Every check-and-charge is one
`BEGIN IMMEDIATE` transaction, which SQLite serialises across processes, so a budget's
reservations from every worker see each other: the same guarantee as the Redis scripts in
`cost/redis_store.py`, whose interface this store has, on one machine and without a server.

The file holds only live counters: spend itself is in the ledger, from which the first
worker to start fills a new file (`seed`), so a restarted server's budgets hold.
Durability is not needed (`synchronous=OFF`); the run directory goes when the supervisor
exits. Calls run in a thread (a transaction waits while another worker holds the lock);
errors surface as `StoreUnavailable`, handled like Redis's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from edgeroute import sqlite_wal
from edgeroute.cost.budgets import Charge, Reserved
from edgeroute.cost.limits import BucketState, Take, take_of
from edgeroute.cost.store_errors import StoreUnavailable

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS budget (key TEXT NOT NULL, slot INTEGER NOT NULL, amount INTEGER NOT NULL, "
    "expires REAL NOT NULL, PRIMARY KEY (key, slot)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS bucket (key TEXT PRIMARY KEY, level REAL NOT NULL, stamp_ms INTEGER NOT NULL, "
    "expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS once (key TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
)
_ADD = (
    "INSERT INTO budget (key, slot, amount, expires) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key, slot) DO UPDATE SET amount = amount + excluded.amount, expires = excluded.expires"
)
_PURGE_EVERY_S = 60.0
SEEDED = "budgets-seeded"  # in `once`: the budgets were read back from the ledger (`seed`)
SEED_TTL_S = 40 * 86400  # a seeded counter outlives its period (a month at most); charges renew it
COUNT_FLUSH_S = 0.1  # managed keys' counts are written together this often (`count_later`)
log = logging.getLogger("edgeroute.cost")


def _refilled_in(limit: int, level: float) -> float:
    """Seconds a bucket at `level` is kept: until it has refilled (at `limit` a minute), and a
    second more. A fixed minute forgot the debt of a bucket below zero: it came back full."""
    return max(0.0, limit - level) * 60 / limit + 1 if limit > 0 else 61.0


class SqliteState:
    """One SQLite connection (per worker) to the shared file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite_wal.connect(path, "OFF", timeout=5.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._purged = 0.0
        self._counts: dict[str, int] = {}  # managed keys' counters not yet written (`count_later`)
        self._counts_ttl = 0
        self._count_timer: asyncio.TimerHandle | None = None
        self._counting: set[asyncio.Task[None]] = set()
        with self._lock:
            for stmt in _SCHEMA:
                self._db.execute(stmt)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def tx() -> T:
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return out

        try:
            return await asyncio.to_thread(tx)
        except sqlite3.Error as e:
            raise StoreUnavailable(type(e).__name__) from None

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._purged >= _PURGE_EVERY_S:
            self._purged = now
            for table in ("budget", "bucket", "once"):
                db.execute(f"DELETE FROM {table} WHERE expires < ?", (now,))

    # -- budgets ---------------------------------------------------------------

    async def reserve(self, charges: list[Charge], now: float) -> Reserved:
        def tx(db: sqlite3.Connection) -> Reserved:
            wall = time.time()
            self._purge(db, wall)
            used: list[int] = []
            blocked = -1
            for i, c in enumerate(charges):
                p = c.period
                if p.rolling:
                    db.execute("DELETE FROM budget WHERE key = ? AND slot < ?", (c.store_key, p.first_slot))
                    row = db.execute("SELECT SUM(amount) FROM budget WHERE key = ?", (c.store_key,)).fetchone()
                else:  # the key names the calendar period: a new period is a new row
                    row = db.execute("SELECT amount FROM budget WHERE key = ? AND slot = -1", (c.store_key,)).fetchone()
                u = int(row[0] or 0) if row is not None else 0
                used.append(u)
                if blocked < 0 and c.block_at >= 0 and u + c.amount > c.block_at:
                    blocked = i
            if blocked < 0:
                for c in charges:
                    p = c.period
                    db.execute(_ADD, (c.store_key, p.slot if p.rolling else -1, c.amount, wall + p.ttl_s))
            return Reserved(blocked < 0, used, blocked)

        return await self._run(tx)

    async def adjust_async(self, charges: list[Charge], deltas: list[int]) -> None:
        pairs = [(c, d) for c, d in zip(charges, deltas, strict=True) if d]
        if not pairs:
            return

        def tx(db: sqlite3.Connection) -> None:
            wall = time.time()
            for c, d in pairs:
                p = c.period
                db.execute(_ADD, (c.store_key, p.slot if p.rolling else -1, d, wall + p.ttl_s))

        await self._run(tx)

    def count_later(self, store_keys: list[str], amount: int, ttl_s: int) -> None:
        """Adds `amount` to managed keys' monthly counters, in one transaction for every count
        of the next `COUNT_FLUSH_S` (this store is seeded before any worker serves)."""
        for key in store_keys:
            self._counts[key] = self._counts.get(key, 0) + amount
        self._counts_ttl = max(self._counts_ttl, ttl_s)
        if self._count_timer is None:
            self._count_timer = asyncio.get_running_loop().call_later(COUNT_FLUSH_S, self._flush_counts)

    def _flush_counts(self) -> None:
        self._count_timer = None
        task = asyncio.get_running_loop().create_task(self._send_counts())
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _send_counts(self) -> None:
        counts, self._counts = self._counts, {}
        if not counts:
            return

        def tx(db: sqlite3.Connection) -> None:
            expires = time.time() + self._counts_ttl
            for key, amount in counts.items():
                db.execute(_ADD, (key, -1, amount, expires))

        try:
            await self._run(tx)
        except StoreUnavailable as e:
            log.warning("workers' state unavailable (%s): %d managed keys' counts lost", e, len(counts))

    async def seed(
        self, spent: dict[tuple[str, int], int], buckets: Sequence[tuple[str, str, int, float]] = ()
    ) -> bool:
        """Counts what the ledger says was spent (`restore.read`: store key and rolling slot ->
        nano-USD) and the last minute's rate-limit use (`buckets`: name, kind, limit, used) into
        a store that has not been seeded, in one transaction, so the first worker to start seeds
        it and the others find it seeded: a restarted server's budgets and limits hold (the
        buckets were left out: `serve --workers N` restarted gave every limit a full minute anew).
        True when this call seeded."""

        def tx(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM once WHERE key = ?", (SEEDED,)).fetchone() is not None:
                return False
            wall = time.time()
            expires = wall + SEED_TTL_S
            for (key, slot), amount in spent.items():
                db.execute(
                    "INSERT OR IGNORE INTO budget (key, slot, amount, expires) VALUES (?, ?, ?, ?)",
                    (key, slot, amount, expires),
                )
            for name, kind, limit, used in buckets:  # as `take` keeps them: level, stamped now
                db.execute(
                    "INSERT OR IGNORE INTO bucket (key, level, stamp_ms, expires) VALUES (?, ?, ?, ?)",
                    (
                        f"{name}:{kind}",
                        level := max(-float(limit), limit - used),
                        int(wall * 1000),
                        wall + _refilled_in(limit, level),
                    ),
                )
            db.execute("INSERT INTO once (key, expires) VALUES (?, ?)", (SEEDED, math.inf))
            return True

        return await self._run(tx)

    async def add_spent(self, spent: dict[tuple[str, int], int], ttl_s: int) -> None:
        """Adds spend read back from the ledger (store key and rolling slot -> nano-USD)."""
        if not spent:
            return

        def tx(db: sqlite3.Connection) -> None:
            expires = time.time() + ttl_s
            for (key, slot), amount in spent.items():
                db.execute(_ADD, (key, slot, amount, expires))

        await self._run(tx)

    async def mark_once(self, key: str, ttl_s: int) -> bool:
        """True the first time `key` is marked (by any worker) within `ttl_s`."""

        def tx(db: sqlite3.Connection) -> bool:
            wall = time.time()
            db.execute("DELETE FROM once WHERE key = ? AND expires < ?", (key, wall))
            cur = db.execute("INSERT OR IGNORE INTO once (key, expires) VALUES (?, ?)", (key, wall + max(1, ttl_s)))
            return cur.rowcount == 1

        return await self._run(tx)

    # -- rate limits (token buckets refilled per millisecond, as in the Redis script) ----

    async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
        def tx(db: sqlite3.Connection) -> tuple[bool, list[BucketState]]:
            now_ms = int(time.time() * 1000)
            levels: list[float] = []
            waits: list[float] = []
            ok = True
            for t in takes:
                key = f"{t.name}:{t.kind}"
                row = db.execute("SELECT level, stamp_ms FROM bucket WHERE key = ?", (key,)).fetchone()
                cap, rate = float(t.limit), t.limit / 60_000
                level, stamp = (float(row[0]), int(row[1])) if row is not None else (cap, now_ms)
                if now_ms > stamp:
                    level = min(cap, level + (now_ms - stamp) * rate)
                levels.append(level)
                wait = 0.0
                if level < t.amount:
                    ok = False
                    wait = math.inf if t.amount > cap else math.ceil((t.amount - level) / rate) / 1000
                waits.append(wait)
            states = []
            for t, level, wait in zip(takes, levels, waits, strict=True):
                taken = take_of(t, level) if ok else 0.0
                level -= taken
                expires = now_ms / 1000 + _refilled_in(t.limit, level)
                db.execute(
                    "INSERT OR REPLACE INTO bucket (key, level, stamp_ms, expires) VALUES (?, ?, ?, ?)",
                    (f"{t.name}:{t.kind}", level, now_ms, expires),
                )
                per_s = t.limit / 60
                states.append(
                    BucketState(
                        t.name, t.kind, t.limit, max(0, int(level)), max(0.0, (t.limit - level) / per_s), wait, taken
                    )
                )
            return ok, states

        return await self._run(tx)

    async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            now_ms = int(time.time() * 1000)
            for t, d in zip(takes, deltas, strict=True):
                key, cap = f"{t.name}:{t.kind}", float(t.limit)
                row = db.execute("SELECT level FROM bucket WHERE key = ?", (key,)).fetchone()
                if row is None and d <= 0:
                    continue  # gone, it is full: a give-back changes nothing
                # A take on a bucket gone meanwhile is written in debt; either way it is kept until
                # it has refilled (expired, a bucket in debt came back full a minute after its take).
                level = min(cap, (cap if row is None else float(row[0])) - d)
                expires = now_ms / 1000 + _refilled_in(t.limit, level)
                if row is None:
                    q = "INSERT OR REPLACE INTO bucket (key, level, stamp_ms, expires) VALUES (?, ?, ?, ?)"
                    db.execute(q, (key, level, now_ms, expires))
                else:
                    q = "UPDATE bucket SET level = ?, expires = MAX(expires, ?) WHERE key = ?"
                    db.execute(q, (level, expires, key))

        await self._run(tx)

    async def close(self, within: float = 5.0) -> None:
        if self._count_timer is not None:
            self._count_timer.cancel()
            self._count_timer = None
        await self._send_counts()
        if self._counting:
            await asyncio.wait(set(self._counting), timeout=within)
        with self._lock:
            self._db.close()
