"""Governance tables in the ledger's database: managed keys, config versions, the audit log.

One small synchronous store over SQLite or PostgreSQL (the same database as the spend
ledger, so every instance sharing the ledger shares keys, versions and audit). Every call
is short and runs off the event loop (`asyncio.to_thread`): keys are served from memory and
refreshed by a poller that reads one counter (`gov_meta.keys`) and, when it moved, only the
rows changed since. On PostgreSQL that poll has a connection of its own: a poll hung on a
vanished peer held the one connection, and every admin call of the instance waited behind
it. A call waits at most `LOCK_WAIT_S` for its connection (`StoreUnavailable`, nothing sent).

The audit log is append-only from the API: nothing here updates or deletes its rows.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeroute import pg_dead_peer, pg_schema, secrets, sqlite_wal
from edgeroute.config import Config
from edgeroute.config import Ledger as LedgerConfig
from edgeroute.cost.store_errors import StoreUnavailable

# The managed keys' reads (the poll, a change's read-back, an unknown key's) run here, not on the
# default executor: whatever else queues there (large bodies' scans, token counts) never holds
# the key store's view back until it is stale. The poll runs one read at a time; the spare
# threads are for a second store's poll while a reload replaces it.
KEY_READS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgeroute-keys")
# The admin API's calls on the store (key create, rotate, revoke; audit and version reads) run
# here: on the default executor, a flood of other work delayed a revocation past its deadline, and
# on KEY_READS, calls hung on a store that does not answer would hold back the poll itself.
ADMIN_CALLS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgeroute-gov")

_TABLES = {
    "sqlite": [
        "CREATE TABLE IF NOT EXISTS gov_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS gov_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS gov_keys (id TEXT PRIMARY KEY, seq BIGINT NOT NULL, data TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS gov_response_owners (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, tokens BIGINT)""",
        """CREATE TABLE IF NOT EXISTS gov_config_versions (
            version INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            source TEXT NOT NULL, applied_by TEXT, body TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS gov_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT, before TEXT, after TEXT)""",
    ],
    "postgres": [
        "CREATE TABLE IF NOT EXISTS gov_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS gov_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS gov_keys (id TEXT PRIMARY KEY, seq BIGINT NOT NULL, data TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS gov_response_owners (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, tokens BIGINT)""",
        """CREATE TABLE IF NOT EXISTS gov_config_versions (
            version BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, hash TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, source TEXT NOT NULL, applied_by TEXT, body TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS gov_audit (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT, before TEXT, after TEXT)""",
    ],
}
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS gov_keys_seq ON gov_keys (seq)",
    "CREATE INDEX IF NOT EXISTS gov_audit_ts ON gov_audit (ts)",
    # `/admin/audit?action=` / `actor=`, newest first: without them a filter scanned the whole log.
    # Made at start on a store of an earlier release (IF NOT EXISTS).
    "CREATE INDEX IF NOT EXISTS gov_audit_action ON gov_audit (action, id)",
    "CREATE INDEX IF NOT EXISTS gov_audit_actor ON gov_audit (actor, id)",
    "CREATE INDEX IF NOT EXISTS gov_response_owners_ts ON gov_response_owners (ts)",
]


_VERSIONS_LOCK = 7422  # adding a config version, one instance at a time (pg_schema.py lists the keys)
_KEY_CAP_LOCK = 7423  # a capped key creation (or move into a team), one instance at a time
# A team's keys not revoked (the team as its own parameter: NULL for keys of no team).
_TEAM_KEYS = {
    "sqlite": "SELECT id, json_extract(data, '$.expires_at') FROM gov_keys "
    "WHERE json_extract(data, '$.team') IS ? AND json_extract(data, '$.revoked_at') IS NULL",
    "postgres": "SELECT id, data::jsonb->>'expires_at' FROM gov_keys "
    "WHERE (data::jsonb->>'team') IS NOT DISTINCT FROM %s AND (data::jsonb->>'revoked_at') IS NULL",
}
RESPONSE_OWNER_TTL = 30 * 86400.0  # how long a provider keeps a stored response (OpenAI's default)
CONTESTED = "!contested"  # the owner of an id given to two owners: no caller's
RESPONSE_PRUNE_EVERY = 3600.0

LOCK_WAIT_S = 3.0  # how long a call waits for its connection, held by another call, before it fails
STORE_DEADLINE_S = 5.0  # an admin call's wait for the governance store (past LOCK_WAIT_S)

AuditRow = tuple[str, str, str | None, Any, Any]  # actor, action, target, before, after


@dataclass(frozen=True, slots=True)
class Version:
    version: int
    hash: str
    created_at: float
    source: str
    applied_by: str | None
    body: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    target: str | None
    before: Any
    after: Any

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
        }


class Gate:
    """Between a write and the caller waiting for it: the caller that stops waiting (`abandon`)
    learns whether the write was sent (it may land yet) or not, and then it never is. A config
    change answered 503 at its deadline can so say truly whether it may have been applied."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = False
        self.abandoned = False

    def send(self) -> None:
        """Called right before the write is sent; raises when the caller stopped waiting."""
        with self._lock:
            if self.abandoned:
                raise StoreUnavailable("the caller stopped waiting before the write was sent", sent=False)
            self.sent = True

    def abandon(self) -> bool:
        """Stops a write not sent yet; True when so (nothing was or will be written)."""
        with self._lock:
            self.abandoned = not self.sent
            return self.abandoned


@dataclass(frozen=True, slots=True)
class KeyCap:
    """At most `most` live keys in the written key's team, counted in the write's own
    transaction (one capped write at a time on the store): a count in memory before the write
    let concurrent creations, on one instance or several, all pass it."""

    most: int
    # keys the caller's view knows ended with a maker (not live; a key's own end is in its row)
    ended: Callable[[str], bool]
    refused: Callable[[], Exception]  # raised, nothing written, when the team is full


@dataclass(frozen=True, slots=True)
class AuditOf:
    """The audit entry a key change writes in its own transaction: a change committed and its
    entry written after it left a revocation without its entry when the process was killed
    between the two (or the second write failed)."""

    actor: str
    action: str
    describe: Callable[[dict[str, Any]], Any]  # what the log shows of a key (never its secret's hash)
    # A change's entry: (before, after) of what changed alone, from the two keys; None: each
    # key whole, by `describe`. A key written whole twice per change let 200 KB lists,
    # alternated, fill the ledger's disk.
    changes: Callable[[dict[str, Any], dict[str, Any]], tuple[Any, Any]] | None = None


def _revives(before: dict[str, Any] | None, after: dict[str, Any], cap: KeyCap) -> bool:
    """Whether a change makes a key live that was not: an expired key given a later expiry
    (a key ended with its maker stays ended, whatever its own expiry)."""
    now = time.time()

    def live(data: dict[str, Any]) -> bool:
        until = data.get("expires_at")
        return data.get("revoked_at") is None and (until is None or float(until) > now)

    return before is not None and not live(before) and live(after) and not cap.ended(after["id"])


class GovStore:
    """Thread-safe access to the governance tables (one connection, one lock; on PostgreSQL a
    second pair for the key poll's reads)."""

    def __init__(self, dialect: str, target: str) -> None:
        self.dialect = dialect
        self._target = target
        self._lock = threading.Lock()
        self._conn: Any = self._connect()
        self._poll_lock = threading.Lock()
        self._poll_conn: Any = None  # connected at the first poll (a local SQLite store shares `_conn`)
        self._owners_pruned = 0.0
        # `governance.audit_retention_days` in seconds (None: kept for ever), and when this
        # process last dropped older entries (at most once an hour, at an entry's write).
        self.audit_retention_s: float | None = None
        self._audit_pruned = 0.0
        with self._held(), self._tx() as cur:
            if dialect == "postgres":
                pg_schema.serialise(cur.execute)
            for stmt in _TABLES[dialect]:
                cur.execute(stmt)
            self._add_tokens_column(cur)
            for stmt in _INDEXES:
                cur.execute(stmt)
            cur.execute(self._sql("INSERT INTO gov_meta (name, value) VALUES ('keys', 0) ON CONFLICT DO NOTHING"))

    def _add_tokens_column(self, cur: Any) -> None:
        """Adds `gov_response_owners.tokens` (a conversation's size) to a table an earlier release
        made, only where it lacks it: ALTER TABLE takes the table's strongest lock even when it
        does nothing. Its rows keep no size (NULL): a continuation of one reserves an allowance."""
        if self.dialect == "postgres":
            cur.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'gov_response_owners'"
            )
        else:
            cur.execute("PRAGMA table_info(gov_response_owners)")
        names = [str(r[0] if self.dialect == "postgres" else r[1]) for r in cur.fetchall()]
        if "tokens" not in names:
            cur.execute("ALTER TABLE gov_response_owners ADD COLUMN tokens BIGINT")

    @classmethod
    def for_config(cls, cfg: Config, base_dir: Path | None, workers_dir: Path | None = None) -> GovStore:
        """The ledger's database; an in-memory SQLite store when there is none (an in-process
        config without a ledger: versions and audit then last as long as the process). With
        `workers_dir` (the run directory of `serve --workers N`), a memory ledger's store is a
        file there, shared by the workers for as long as the server runs: in each worker's
        memory, a managed key made through one worker was refused by the others, and a key
        revoked through one was still served by the others."""
        lc = cfg.ledger
        if lc is None and base_dir is not None:
            lc = LedgerConfig()
        if (lc is None or lc.backend == "memory") and workers_dir is not None:
            return cls("sqlite", str(workers_dir / "governance.db"))
        if lc is None or lc.backend == "memory":
            return cls("sqlite", ":memory:")
        if lc.backend == "postgres":
            assert lc.dsn is not None
            return cls("postgres", secrets.resolve(lc.dsn, base_dir=base_dir).reveal())
        path = Path(lc.path)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return cls("sqlite", str(path))

    def _connect(self) -> Any:
        if self.dialect == "postgres":
            return _pg_connect(self._target)
        if self._target == ":memory:":
            return sqlite3.connect(self._target, check_same_thread=False, timeout=10, isolation_level=None)
        return sqlite_wal.connect(self._target, check_same_thread=False, timeout=10, isolation_level=None)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def _tx(self, write: bool = True) -> _Tx:
        if self.dialect == "postgres" and self._conn.closed:
            self._conn = self._connect()
        return _Tx(self._conn, self.dialect, write)

    @contextmanager
    def _held(self, lock: threading.Lock | None = None) -> Iterator[None]:
        """Holds `lock` (the main connection's by default), waiting at most LOCK_WAIT_S."""
        lock = self._lock if lock is None else lock
        if not lock.acquire(timeout=LOCK_WAIT_S):
            # Still held by a call that has not returned (a query hung on a vanished peer): fail
            # before sending anything rather than queue behind it.
            msg = f"the governance store's connection has been busy for over {LOCK_WAIT_S:g} s"
            raise StoreUnavailable(msg, sent=False)
        try:
            yield
        finally:
            lock.release()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._held():
            try:
                return self._read(sql, params)
            except Exception:
                if self.dialect != "postgres" or not self._conn.closed:
                    raise
            # The connection was lost since its last call (a restart, a cut after a commit): a
            # read is asked again on a new one. The poll, on this connection, used to find that first.
            return self._read(sql, params)

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._tx(write=False) as cur:
            cur.execute(self._sql(sql), tuple(params))
            return [tuple(r) for r in cur.fetchall()]

    def _poll_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read for the key poll, on its own connection (PostgreSQL): a poll that hangs holds
        that one alone, and no admin call waits behind it."""
        if self.dialect != "postgres":
            return self._query(sql, params)
        with self._held(self._poll_lock):
            if self._poll_conn is None or self._poll_conn.closed:
                self._poll_conn = self._connect()
            with _Tx(self._poll_conn, self.dialect, write=False) as cur:
                cur.execute(self._sql(sql), tuple(params))
                return [tuple(r) for r in cur.fetchall()]

    def close(self) -> None:
        # A connection held by a hung call is closed all the same: shutdown must not wait for it.
        for lock, conn in ((self._lock, self._conn), (self._poll_lock, self._poll_conn)):
            held = lock.acquire(timeout=LOCK_WAIT_S)
            try:
                if conn is not None:
                    conn.close()
            finally:
                if held:
                    lock.release()

    # -- Responses ids: whose conversation each one is ----------------------------

    def bind_responses(self, ids: Sequence[str], owner: str, sizes: Mapping[str, int] | None = None) -> None:
        """Records that `owner` created each of `ids` (a response, or a prefixed id: `audio:`,
        `container:`, `file:`), in one transaction; `sizes`: the size of the conversation a
        response id continues (its input and output tokens as billed), by id, where known. An id
        already bound to another owner becomes no one's (`CONTESTED`): an upstream that gave two
        tenants one id (its ids counted from 1 again after a restart) stores the later
        conversation under it, which the first owner would otherwise continue. Bindings older
        than a provider keeps a stored response (OpenAI: 30 days) go, at most once an hour per
        process."""
        now = time.time()
        with self._held(), self._tx() as cur:
            for response_id in ids:
                cur.execute(
                    self._sql(
                        "INSERT INTO gov_response_owners (id, owner, ts, tokens) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (id) DO UPDATE SET owner = ? WHERE gov_response_owners.owner <> excluded.owner"
                    ),
                    (response_id, owner, now, (sizes or {}).get(response_id), CONTESTED),
                )
            if now - self._owners_pruned >= RESPONSE_PRUNE_EVERY:
                self._owners_pruned = now
                cur.execute(self._sql("DELETE FROM gov_response_owners WHERE ts < ?"), (now - RESPONSE_OWNER_TTL,))

    def response_owner(self, response_id: str) -> str | None:
        return self.response_binding(response_id)[0]

    def response_binding(self, response_id: str) -> tuple[str | None, int | None]:
        """(who `response_id` is bound to, the conversation's size recorded with it): None for what is not known."""
        rows = self._query("SELECT owner, tokens FROM gov_response_owners WHERE id = ?", (response_id,))
        if not rows:
            return None, None
        owner, tokens = rows[0]
        return str(owner), int(tokens) if tokens is not None else None

    def size_response(self, response_id: str, owner: str, tokens: int) -> None:
        """Records the size of `owner`'s conversation `response_id` once known (a stream's, at its
        end: its id was bound at its first event); an id bound to anyone else is left as it is."""
        with self._held(), self._tx() as cur:
            cur.execute(
                self._sql("UPDATE gov_response_owners SET tokens = ? WHERE id = ? AND owner = ?"),
                (tokens, response_id, owner),
            )

    # -- managed keys -----------------------------------------------------------

    def keys_seq(self) -> int:
        return int(self._poll_query("SELECT value FROM gov_meta WHERE name = 'keys'")[0][0])

    def keys_since(self, seq: int) -> list[tuple[int, dict[str, Any]]]:
        rows = self._poll_query("SELECT seq, data FROM gov_keys WHERE seq > ? ORDER BY seq", (seq,))
        return [(int(s), orjson.loads(d)) for s, d in rows]

    def get_key(self, key_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT data FROM gov_keys WHERE id = ?", (key_id,))
        return orjson.loads(rows[0][0]) if rows else None

    def put_key(
        self, data: dict[str, Any], *, create: bool = False, audit: AuditOf | None = None, cap: KeyCap | None = None
    ) -> int:
        """Writes a key and moves the change counter (and appends `audit`), in one transaction;
        returns the new counter. With `create`, an existing id is an error (`KeyError`); with
        `cap`, a full team is `cap.refused()`."""
        with self._held(), self._tx() as cur:
            if create:
                cur.execute(self._sql("SELECT 1 FROM gov_keys WHERE id = ?"), (data["id"],))
                if cur.fetchone() is not None:
                    raise KeyError(data["id"])
            if cap is not None:
                self._check_cap(cur, data, cap)
            seq = self._write_key(cur, data)
            if audit is not None:
                self._append_audit(cur, audit.actor, audit.action, data["id"], None, audit.describe(data))
            return seq

    def change_key(
        self,
        key_id: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any]],
        audit: AuditOf | None = None,
        cap: KeyCap | None = None,
        also: Sequence[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], AuditOf | None]] = (),
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Reads a key and writes `change(key)` (None: no such key) in one transaction, so that
        no other change falls between (a revocation written between a rotation's read and its
        write was undone by it), with its `audit` entry; an exception from `change` writes
        nothing, and neither does a `change` that returns the key itself (nothing to change: no
        write, no audit entry). `also`: changes of other keys (id, change, audit) made in the
        same transaction when this one writes (a key absent, or returned as it is, is left).
        Returns (before, after)."""
        with self._held(), self._tx() as cur:
            before = self._locked(cur, key_id)
            after = change(before)
            if after is before:
                return before, after
            if cap is not None and ((before or {}).get("team") != after.get("team") or _revives(before, after, cap)):
                self._check_cap(cur, after, cap)  # moved into a team, or live again: room for it there
            self._write_changed(cur, key_id, before, after, audit)
            for other_id, other_change, other_audit in also:
                if (was := self._locked(cur, other_id)) is not None and (now := other_change(was)) is not was:
                    self._write_changed(cur, other_id, was, now, other_audit)
            return before, after

    def _locked(self, cur: Any, key_id: str) -> dict[str, Any] | None:
        """A key read for a change in the transaction of `cur` (held until it ends)."""
        lock = " FOR UPDATE" if self.dialect == "postgres" else ""  # SQLite's writer holds the database
        cur.execute(self._sql("SELECT data FROM gov_keys WHERE id = ?" + lock), (key_id,))
        row = cur.fetchone()
        return orjson.loads(row[0]) if row is not None else None

    def _write_changed(
        self, cur: Any, key_id: str, before: dict[str, Any] | None, after: dict[str, Any], audit: AuditOf | None
    ) -> None:
        self._write_key(cur, after)
        if audit is not None:
            if audit.changes is not None and before is not None:
                was, now = audit.changes(before, after)
            else:
                was, now = (audit.describe(before) if before is not None else None), audit.describe(after)
            self._append_audit(cur, audit.actor, audit.action, key_id, was, now)

    def _check_cap(self, cur: Any, data: dict[str, Any], cap: KeyCap) -> None:
        """Raises `cap.refused()` when the team `data` joins holds `cap.most` live keys besides it."""
        if self.dialect == "postgres":  # as SQLite's BEGIN IMMEDIATE: two instances' counts serialised
            cur.execute(f"SELECT pg_advisory_xact_lock({_KEY_CAP_LOCK})")
        cur.execute(_TEAM_KEYS[self.dialect], (data.get("team"),))
        now = time.time()
        live = sum(
            1
            for key_id, until in cur.fetchall()
            if key_id != data["id"] and not (until is not None and float(until) <= now) and not cap.ended(key_id)
        )
        if live >= cap.most:
            raise cap.refused()

    def _write_key(self, cur: Any, data: dict[str, Any]) -> int:
        cur.execute(self._sql("UPDATE gov_meta SET value = value + 1 WHERE name = 'keys' RETURNING value"))
        seq = int(cur.fetchone()[0])
        cur.execute(
            self._sql(
                "INSERT INTO gov_keys (id, seq, data) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, data = excluded.data"
            ),
            (data["id"], seq, orjson.dumps(data).decode()),
        )
        return seq

    # -- config versions --------------------------------------------------------

    def versions_key(self) -> bytes:
        """The store's own random key for the HMAC of literal secrets in stored versions: made by
        the first instance that asks, the same for every instance and worker on this store."""
        return self._own_key("versions")

    def actors_key(self) -> bytes:
        """The store's own random key for the audit's name of a shared key (`shared:<HMAC>`),
        made and shared as `versions_key`: a copy of the audit alone cannot test guesses of it."""
        return self._own_key("actors")

    def experiment_salt(self) -> bytes | None:
        """The store's random salt for keyed requests' experiment arms (`sticky.py`), made once and
        the same for every instance on this store and after a restart; None for a store in this
        process's memory (no other instance shares it, and a restart would reshuffle the arms)."""
        return None if self._target == ":memory:" else self._own_key("experiment_salt")

    def makers_key(self) -> bytes:
        """The store's own random key from which each config key's fingerprint salt is derived
        (`ManagedKeys.maker_print`), made and shared as `versions_key`."""
        return self._own_key("makers")

    def maker_records(self) -> dict[str, str]:
        """The fingerprint of each config key's token as an instance last ran with it, by id."""
        rows = self._query("SELECT name, value FROM gov_secrets WHERE name LIKE ?", ("maker:%",))
        return {str(n).removeprefix("maker:"): str(v) for n, v in rows}

    def set_maker_records(self, put: Mapping[str, str], drop: Sequence[str] = ()) -> None:
        """Writes the given records (`maker_records`) and drops those of `drop`, in one transaction."""
        with self._held(), self._tx() as cur:
            for name in drop:
                cur.execute(self._sql("DELETE FROM gov_secrets WHERE name = ?"), ("maker:" + name,))
            for name, value in put.items():
                cur.execute(
                    self._sql(
                        "INSERT INTO gov_secrets (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                    ),
                    ("maker:" + name, value),
                )

    def _own_key(self, name: str) -> bytes:
        """32 random bytes kept under `name`: the first caller's, for every caller after it."""
        with self._held(), self._tx() as cur:
            cur.execute(
                self._sql("INSERT INTO gov_secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING"),
                (name, os.urandom(32).hex()),
            )
            cur.execute(self._sql("SELECT value FROM gov_secrets WHERE name = ?"), (name,))
            return bytes.fromhex(cur.fetchone()[0])

    def add_version(
        self,
        digest: str,
        source: str,
        applied_by: str | None,
        body: str,
        audit: Callable[[int], Sequence[AuditRow]] | None = None,
        audit_if_same: bool = True,
        gate: Gate | None = None,
    ) -> tuple[int, bool]:
        """Stores a config about to be applied, with its audit entries (`audit(version)`) in the
        same transaction: both or neither. A config identical to the latest version reuses its
        number (audited only with `audit_if_same`). Returns (version, created). With `gate`, the
        write is sent only if its caller still waits (`Gate`)."""
        with self._held():
            if gate is not None:
                gate.send()
            return self._add_version(digest, source, applied_by, body, audit, audit_if_same)

    def _add_version(
        self,
        digest: str,
        source: str,
        applied_by: str | None,
        body: str,
        audit: Callable[[int], Sequence[AuditRow]] | None,
        audit_if_same: bool,
    ) -> tuple[int, bool]:
        with self._tx() as cur:
            if self.dialect == "postgres":  # as SQLite's BEGIN IMMEDIATE: instances started at once
                # each found no version (READ COMMITTED) and added the same config again
                cur.execute(f"SELECT pg_advisory_xact_lock({_VERSIONS_LOCK})")
            cur.execute("SELECT version, hash FROM gov_config_versions ORDER BY version DESC LIMIT 1")
            last = cur.fetchone()
            if last is not None and last[1] == digest:
                version, created = int(last[0]), False
            else:
                cur.execute(
                    self._sql(
                        "INSERT INTO gov_config_versions (hash, created_at, source, applied_by, body) "
                        "VALUES (?, ?, ?, ?, ?) RETURNING version"
                    ),
                    (digest, time.time(), source, applied_by, body),
                )
                version, created = int(cur.fetchone()[0]), True
            if audit is not None and (created or audit_if_same):
                for row in audit(version):
                    self._append_audit(cur, *row)
            return version, created

    def versions(self, limit: int = 200) -> list[Version]:
        rows = self._query(
            "SELECT version, hash, created_at, source, applied_by, body FROM gov_config_versions "
            "ORDER BY version DESC LIMIT ?",
            (limit,),
        )
        return [_version(r) for r in rows]

    def version(self, v: int) -> Version | None:
        rows = self._query(
            "SELECT version, hash, created_at, source, applied_by, body FROM gov_config_versions WHERE version = ?",
            (v,),
        )
        return _version(rows[0]) if rows else None

    # -- audit ------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str | None, before: Any = None, after: Any = None) -> None:
        with self._held(), self._tx() as cur:
            self._append_audit(cur, actor, action, target, before, after)

    def _append_audit(self, cur: Any, actor: str, action: str, target: str | None, before: Any, after: Any) -> None:
        def enc(v: Any) -> str | None:
            return None if v is None else orjson.dumps(v).decode()

        now = time.time()
        cur.execute(
            self._sql("INSERT INTO gov_audit (ts, actor, action, target, before, after) VALUES (?, ?, ?, ?, ?, ?)"),
            (now, actor, action, target, enc(before), enc(after)),
        )
        if self.audit_retention_s is not None and now - self._audit_pruned >= RESPONSE_PRUNE_EVERY:
            self._audit_pruned = now
            cur.execute(self._sql("DELETE FROM gov_audit WHERE ts < ?"), (now - self.audit_retention_s,))

    def audit_entries(
        self,
        since: float | None = None,
        actor: str | None = None,
        action: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
        until: float | None = None,
        end: float | None = None,
    ) -> list[AuditEntry]:
        """The newest `limit` entries that match, newest first; `before_id` continues a page
        (entries older than that id: a flood of new entries does not shift the pages). With `end`
        (monotonic), read on a connection of its own and stopped then (TimeoutError): a slow
        read holds neither the lock key writes and the key poll need nor a thread past it."""
        where: list[str] = []
        params: list[Any] = []
        for clause, value in (("ts >= ?", since), ("ts < ?", until), ("id < ?", before_id)):
            if value is not None:
                where.append(clause)
                params.append(value)
        if actor is not None:
            where.append("actor = ?")
            params.append(actor)
        cols = "SELECT id, ts, actor, action, target, before, after FROM gov_audit"

        def read(sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
            return self._query(sql, args) if end is None else self._read_until(sql, args, end)

        if action is None:
            rows = read(f"{cols}{_where(where)} ORDER BY id DESC LIMIT ?", (*params, limit))
        else:
            # `key` matches key.created, key.rotated...; an exact name matches itself. Each action's
            # newest from the (action, id) index, merged: a range or LIKE over them all sorted
            # every match (seconds on a large log) before its first page.
            names = [a for (a,) in read(_ACTIONS, (_MAX_ACTIONS,)) if a == action or a.startswith(action + ".")]
            if not names:
                return []
            bound: list[str] = []
            bounds: list[Any] = []
            if since is not None:
                # Each action's walk down its (action, id) index stops at the window's smallest id:
                # with `ts` alone, `key&since=1m` read every old `key.*` entry before it found none.
                bound, bounds = [_WINDOW_FIRST_ID], [_WINDOW_SCAN, since, _WINDOW_SCAN]
            one = f"SELECT * FROM ({cols}{_where(['action = ?', *where, *bound])} ORDER BY id DESC LIMIT ?) AS a"
            sql = " UNION ALL ".join(f"{one}{i}" for i in range(len(names)))
            args = [x for name in names for x in (name, *params, *bounds, limit)]
            rows = read(f"SELECT * FROM ({sql}) AS u ORDER BY id DESC LIMIT ?", (*args, limit))
        return [
            AuditEntry(
                int(r[0]),
                float(r[1]),
                r[2],
                r[3],
                r[4],
                orjson.loads(r[5]) if r[5] else None,
                orjson.loads(r[6]) if r[6] else None,
            )
            for r in rows
        ]

    def _read_until(self, sql: str, params: Sequence[Any], end: float) -> list[tuple[Any, ...]]:
        """An audit read on a connection of its own, stopped at `end` (TimeoutError)."""
        if self.dialect == "sqlite":
            if self._target != ":memory:":  # WAL: a reader of its own waits for no writer
                return sqlite_wal.read_until(self._target, sql, params, end)
            with self._held():  # one process's memory: no other connection sees it
                self._conn.set_progress_handler(lambda: int(time.monotonic() > end), sqlite_wal.PROGRESS_STEPS)
                try:
                    return self._read(sql, params)
                except sqlite3.OperationalError as e:
                    if "interrupt" in str(e):
                        raise TimeoutError from None
                    raise
                finally:
                    self._conn.set_progress_handler(None, 0)
        import psycopg

        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        with _pg_connect(self._target) as conn:  # closed at the end: audit reads are rare
            conn.execute(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
            try:
                return [tuple(r) for r in conn.execute(self._sql(sql), tuple(params)).fetchall()]
            except psycopg.errors.QueryCanceled:
                raise TimeoutError from None


# The audit log's distinct actions, from the (action, id) index: one step each (a loose index scan).
_MAX_ACTIONS = 200
_ACTIONS = """WITH RECURSIVE acts(a, n) AS (
    SELECT MIN(action), 1 FROM gov_audit
    UNION ALL
    SELECT (SELECT MIN(action) FROM gov_audit WHERE action > acts.a), n + 1 FROM acts WHERE acts.a IS NOT NULL AND n < ?
) SELECT a FROM acts WHERE a IS NOT NULL"""


# The smallest id among the entries since a time, off the ts index (`MIN(id)` alone walks the
# ids up from the oldest); 0 (no bound: the walk stops at its `limit` matches) for a window
# of more entries than are worth reading for it. Exact either way: an entry's id and ts need
# not grow together (instances' clocks differ).
_WINDOW_SCAN = 10_000
_WINDOW_FIRST_ID = """id >= (SELECT CASE WHEN COUNT(*) < ? THEN MIN(id) ELSE 0 END
    FROM (SELECT id FROM gov_audit WHERE ts >= ? ORDER BY ts LIMIT ?) AS w)"""


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _pg_connect(dsn: str) -> Any:
    """A session bounded against a vanished peer: the key poll on one a partition cut off hung
    (no error, so no log) for the kernel's 15 minutes, serving keys revoked meanwhile; and
    PostgreSQL held a cut-off change's row locks for its keepalive's two hours."""
    import psycopg

    conn = psycopg.connect(dsn, autocommit=False, connect_timeout=5, **pg_dead_peer.CLIENT)
    try:
        conn.execute(pg_dead_peer.SERVER)
        conn.commit()
    except psycopg.Error:
        conn.rollback()  # a pooler may refuse SET: PostgreSQL's defaults then, the client's bounds hold
    return conn


def _version(r: tuple[Any, ...]) -> Version:
    return Version(int(r[0]), r[1], float(r[2]), r[3], r[4], r[5])


class _Tx:
    """A transaction on the store's one connection: commit on success, roll back on error."""

    def __init__(self, conn: Any, dialect: str, write: bool) -> None:
        self.conn = conn
        self.dialect = dialect
        self.write = write
        self.cur: Any = None

    def __enter__(self) -> Any:
        self.cur = self.conn.cursor()
        if self.dialect == "sqlite":
            # A writer takes the lock up front, so two instances cannot interleave a read-modify-write.
            self.cur.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self.cur

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self.conn.commit() if self.dialect == "postgres" else self.cur.execute("COMMIT")
            else:
                self.conn.rollback() if self.dialect == "postgres" else self.cur.execute("ROLLBACK")
        finally:
            self.cur.close()
