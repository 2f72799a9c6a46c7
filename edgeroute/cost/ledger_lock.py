"""One `edgeroute serve` per SQLite ledger, unless budgets are shared through Redis.

Without `shared_state`, a server counts budgets and rate limits in its own memory (its
workers, in their run directory's file) and reads them back from its ledger at start. A
second `edgeroute serve` pointed at the same ledger (the same config directory, started
twice) counted apart: each admitted the whole budget, so two spent it twice, and after a
restart each read back the other's spend as its own. So `serve` holds an advisory lock on
`<ledger>.lock` for as long as it runs: exclusive when it counts budgets or limits alone,
shared otherwise (with `shared_state`, or with no cost control at all), and a server that
cannot take its lock stops before serving with an error that says why. A supervisor
(`serve --workers N`) holds it for its workers. The lock is the kernel's (`flock`): a
process killed with SIGKILL releases it, so a restart after a crash is never refused.

A PostgreSQL ledger is held the same way with an advisory lock on a connection of its own
(released when the process dies and its connection closes). A ledger is its schema's tables
(`search_path` in the DSN), so the lock is the schema's: two gateways whose ledgers live in two
schemas of one database are two ledgers, not one held twice. Several machines sharing one
ledger share budgets through `shared_state` (the README's "Several workers or several
machines"): their locks are shared ones.

That session ends when PostgreSQL restarts (or an administrator terminates it), and the lock
with it: a second server could then take the ledger while this one went on spending. So a
thread checks the connection every `WATCH_S`, connects again and takes the lock back. When
another server holds it by then, this one says so on stderr and `lost()` tells why: the
server answers 503 to every request that could spend and `/readyz` is 503, until it holds
the lock again (it keeps trying). Under a supervisor, which holds the lock for its workers,
the workers read it from a file in the run directory (`publish`).

While the session is down and cannot be made again (a network partition, PostgreSQL down), a
server that counts budgets alone no longer holds the lock either: a second server could take
the ledger meanwhile and spend beside it (a partition let each of two servers spend half the
budget again, $1.52 of $1.00). So after `LOCK_GRACE_S` without the lock it refuses too, as
`ledger.on_unavailable: closed` does, until it holds the lock again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeroute.config import Config
from edgeroute.config import Ledger as LedgerConfig
from edgeroute.pg_dead_peer import CLIENT as _DEAD_PEER
from edgeroute.pg_dead_peer import SERVER as _SERVER_DEAD_PEER
from edgeroute.workers import worker as workers


class LedgerInUse(Exception):
    """Another `edgeroute serve` holds the ledger in a way this one cannot share."""


_PG_LOCK = 7421  # pg_schema.SCHEMA_LOCK (7420) guards the tables' creation
# The lock's key: 7421 for `public` (as before schemas had locks of their own, so a server of an
# earlier version and this one still exclude each other there), else one per schema. An SQL
# expression of the connection's schema (a test reads it to find the lock's holder).
PG_KEY = (
    f"CASE WHEN coalesce(current_schema(), 'public') = 'public' THEN {_PG_LOCK}::bigint "
    f"ELSE ({_PG_LOCK}::bigint << 32) + hashtext(current_schema()) END"
)
_held: list[object] = []  # the PostgreSQL lock's holder (`_PgHold`), kept for the process's life
WATCH_S = 1.0  # how often the held session is checked (a PostgreSQL restart ends it)
# How long a server counting alone goes on spending while it cannot take its lock back: a
# restart of PostgreSQL passes within it unnoticed, a partition does not.
LOCK_GRACE_S = 3.0
LOST_FILE = "ledger-lock.lost"  # in a supervisor's run directory: why its workers must not spend
_lost: str | None = None  # set by the watcher while another server holds the lock
_read: tuple[float, str | None] = (0.0, None)  # a worker's last read of the supervisor's file
# Run by the watcher once it holds the lock again after losing it, before requests are taken
# again: the budgets read back what another server may have spent meanwhile (one that raises
# keeps requests refused, and is run again a tick later).
_taken_back: list[Callable[[], None]] = []


def on_taken_back(fn: Callable[[], None]) -> Callable[[], None]:
    """Runs `fn` (in the watcher's thread) each time the lock is held again after a loss;
    returns what unregisters it."""
    _taken_back.append(fn)
    return lambda: _taken_back.remove(fn) if fn in _taken_back else None


def lost() -> str | None:
    """Why this server must not take spend now (another server holds the ledger's lock), or None."""
    global _read
    if _held or _lost is not None:
        return _lost
    now = time.monotonic()
    if now - _read[0] < 0.5:  # a stat per half second, not per request
        return _read[1]
    why: str | None = None
    if (worker := workers.current()) is not None:
        with contextlib.suppress(OSError):
            why = (worker.dir / LOST_FILE).read_text()
    _read = (now, why)
    return why


def publish(run_dir: Path) -> None:
    """A supervisor's tick: `lost()` as a file its workers read (written or removed on change)."""
    path = run_dir / LOST_FILE
    with contextlib.suppress(OSError):
        if _lost is None:
            path.unlink(missing_ok=True)
        elif not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(_lost)
            tmp.replace(path)


def _base(source: str) -> Path | None:
    return Path(source).parent if Path(source).is_file() else None


def ledger_path(cfg: Config, source: str) -> Path | None:
    """The SQLite ledger `serve` would write for this config (None: no SQLite ledger)."""
    base = _base(source)
    if cfg.ledger is None and base is None:  # as `ledger_from_config`: no ledger then
        return None
    lc = cfg.ledger or LedgerConfig()
    if lc.backend != "sqlite":
        return None
    path = Path(lc.path)
    return (base / path if base is not None and not path.is_absolute() else path).absolute()


def counts_alone(cfg: Config) -> bool:
    """Budgets or rate limits counted by this server only (no `shared_state`)."""
    from edgeroute.cost.control import CostControl

    return cfg.shared_state is None and CostControl.wanted(cfg)


def claim(cfg: Config, source: str) -> int | None:
    """Takes the ledger's lock for this process's lifetime; returns its descriptor (None: no
    SQLite ledger, or a lock file that cannot be made: the ledger's own opening then says
    why). Raises `LedgerInUse` when another server holds it in a way this one cannot share."""
    lc = cfg.ledger or LedgerConfig()
    if lc.backend == "postgres":
        _claim_postgres(lc, source, counts_alone(cfg))
        return None
    path = ledger_path(cfg, source)
    if path is None:
        return None
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    alone = counts_alone(cfg)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise _in_use(f"another edgeroute serve{f' (pid {holder})' if holder else ''}", str(path), alone) from None
    with contextlib.suppress(OSError):  # a full disk: the ledger's opening says so
        os.ftruncate(fd, 0)  # no stale pid of an earlier holder
        if alone:  # the one holder: say who, for the next one's error
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def _in_use(who: str, ledger: str, alone: bool) -> LedgerInUse:
    if alone:
        why = (
            f"{who} is using the ledger {ledger}; without shared_state this server counts budgets and "
            "rate limits alone, so two servers on one ledger would each spend every budget in full"
        )
    else:
        why = (
            f"{who} counts budgets and rate limits alone on the ledger {ledger} (it has no shared_state); "
            "a second server on that ledger would spend beside its budgets"
        )
    return LedgerInUse(
        f"{why}. Stop the other server, give this one its own ledger (ledger.path or ledger.dsn), or share "
        "budgets and limits through shared_state (Redis) in both configs."
    )


def _claim_postgres(lc: LedgerConfig, source: str, alone: bool) -> None:
    """An advisory lock on a connection held for the process's life; a database that cannot be
    reached is left to the ledger's opening to report."""
    import psycopg

    from edgeroute import secrets

    assert lc.dsn is not None
    try:
        hold = _PgHold(secrets.resolve(lc.dsn, base_dir=_base(source)).reveal(), alone)
        taken = hold.take()
    except (psycopg.Error, secrets.SecretError):
        return
    if not taken:
        raise _in_use("another edgeroute serve", "(PostgreSQL: ledger.dsn)", alone)
    _held.append(hold)
    threading.Thread(target=hold.watch, name="ledger-lock", daemon=True).start()


class _PgHold:
    """The connection holding the PostgreSQL ledger's lock, taken back after its session ends."""

    def __init__(self, dsn: str, alone: bool) -> None:
        self.dsn, self.alone = dsn, alone
        self.conn: Any = None
        # This process's sessions alone carry the name: one a partition cut off is found by it.
        self.name = f"edgeroute ledger lock {os.getpid()} {secrets.token_hex(6)}"

    def take(self) -> bool:
        """Connects and tries the lock (raises psycopg.Error when the database cannot be reached)."""
        import psycopg

        self.close()
        conn: Any = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=5, application_name=self.name, **_DEAD_PEER
        )
        try:
            try:  # PostgreSQL's own side: it ends a vanished peer's session
                conn.execute(_SERVER_DEAD_PEER)
            except psycopg.Error as e:
                _say(f"edgeroute: the ledger's lock session keeps PostgreSQL's keepalive defaults ({e})")
            fn = "pg_try_advisory_lock" if self.alone else "pg_try_advisory_lock_shared"
            for _ in range(20):
                row = conn.execute(f"SELECT {fn}({PG_KEY})").fetchone()
                if row is not None and row[0]:
                    self.conn, conn = conn, None
                    return True
                if not self._end_orphans(conn):
                    break
                time.sleep(0.05)  # the ended session lets go of the lock as its backend exits
            return False
        finally:
            if conn is not None:  # not holding the lock: a query failed, or another holds it
                conn.close()

    def _end_orphans(self, conn: Any) -> bool:
        """Ends this process's own earlier lock sessions (whether any was found): a partition
        that drops packets leaves PostgreSQL's side of the lock's session open, holding the lock
        for hours (its keepalive), and the healed server read its own session as another
        server's and refused spend until then."""
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s"
            " AND pid <> pg_backend_pid()",
            (self.name,),
        ).fetchall()
        return bool(rows)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def watch(self) -> None:
        import psycopg

        global _lost
        down_since: float | None = None
        while True:
            time.sleep(WATCH_S)
            try:
                if self.conn is not None:
                    self.conn.execute("SELECT 1")
                    if _lost is not None:  # held again, not caught up with the ledger yet
                        self._caught_up()
                    continue
            except psycopg.Error:
                self.close()  # the session ended: the lock went with it
                down_since = time.monotonic()
            try:
                taken = self.take()
            except psycopg.Error:
                self._unreachable(down_since)
                continue  # still down: spend goes on being held by the ledger, which says so
            if taken:
                if _lost is not None:
                    self._caught_up()
                elif down_since is not None:
                    _say("edgeroute: the ledger's PostgreSQL session ended (a restart?); its lock is taken again")
                down_since = None
            elif _lost is None:
                _lost = (
                    "another edgeroute serve took the ledger's lock (PostgreSQL: ledger.dsn) while this "
                    "server's session with the database was down (PostgreSQL restarted?)"
                )
                _say(
                    f"edgeroute: {_lost}. Without shared_state, two servers on one ledger would each spend "
                    "every budget in full: this one refuses requests (503) and is not ready until it "
                    "holds the lock again. Stop one of the two servers, or share budgets through shared_state."
                )

    def _caught_up(self) -> None:
        """Takes requests again once what another server may have spent while this one did not
        hold the lock is counted (`on_taken_back`): else it resumed on its own counters, and
        the two servers' spend together passed the budget."""
        global _lost
        try:
            for fn in list(_taken_back):
                fn()
        except Exception as e:
            _say(f"edgeroute: the ledger's lock is held again, but its spend could not be read back yet ({e!r})")
            return
        _lost = None
        _say("edgeroute: the ledger's lock is held again and its spend read back; taking requests again")

    def _unreachable(self, down_since: float | None) -> None:
        """The session is down and cannot be made again: a server counting alone stops spending
        once `LOCK_GRACE_S` has passed, since it cannot prove that it still holds the ledger."""
        global _lost
        if not self.alone or _lost is not None or down_since is None:
            return
        if (gone := time.monotonic() - down_since) < LOCK_GRACE_S:
            return
        _lost = (
            f"this server's session with the ledger's database (PostgreSQL: ledger.dsn) has been down for "
            f"{gone:.0f}s, so it no longer holds the ledger's lock and another edgeroute serve could take it"
        )
        _say(
            f"edgeroute: {_lost}. Without shared_state, two servers on one ledger would each spend every budget "
            "in full: this one refuses requests (503) and is not ready until it holds the lock again."
        )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
