"""The feedback learner's posteriors and recent requests shared between processes: the
instances that share Redis (`shared_state`), or the workers of one `serve --workers N`
without it (a SQLite file in the supervisor's run directory).

Feedback then counts the same wherever it is posted and wherever the request was served:

- each process sends what it learned (the reward and its complement per (task, route, tenant))
  as increments of one table of sums (in Redis, hashes: `{prefix}:learn:posteriors` for the
  anonymous tenant, as releases before tenants were kept wrote it, and `{prefix}:learn:tenant-sums`
  for the others, which such a release does not read), and every
  `SYNC_S` reads the sums back: every process's posteriors are then the prior plus everyone's
  feedback, pooled per tenant as the learner does (`learning.pool`); a sum from before tenants
  were kept (task, route only) counts as the anonymous tenant's;
- each request it answered (route, task, cost, key, team, whether a cache hit) is kept for
  `REMEMBER_S`, so feedback posted to another process finds it, and checks whose it is.

Both are sent in batches every `SYNC_S`, off the request path, in one transaction. A store
that was never seeded (a new Redis, one restarted empty, or the workers' new file at each
start) takes no sums until a process has merged its own into it (`seed`: at start, those
loaded from its `state_path`; later, those it routes with, less its unsent scores). Seeding
raises each sum to the process's value when that is larger (never lowers one), and every
sync seeds again when the store holds less than the process counted, so a process that
seeds an empty table first (a new instance without a state file) takes nothing from the
others, and no process ever replaces what it learned with less. The sums are refused rather
than added to an empty store inside the same transaction that checks the mark, so no score
lands before the seed and then counts twice or not at all.

An admin's reset (`POST /admin/learning/reset`, optionally one task, route or tenant) is the
one way evidence shrinks: it removes those sums from the store and counts a reset (its epoch) in
the same transaction. Every process sees the new epoch at its next sync and takes the store's
sums as they are, dropping what it held (its floor, and its scores not yet sent, which the
store refuses from a process that has not seen the reset), rather than writing them back; a
process starting with a state file saved before the reset does the same.

A score is claimed in the store (once per request, fleet-wide) only while the store holds the
request's record: once that is gone (its `REMEMBER_S` expiry, a flush, a restart without
data) the rated mark may be gone too, so the score is stored for the log but not learned,
rather than counted a second time. The store down: feedback on requests this process
served still counts here until the next sync (scores that could not be sent are not sent
twice); feedback on another process's requests is answered 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import orjson
from aiohttp import web

from edgeroute import background, redis_client
from edgeroute.config import Config, SharedState
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.learning import (
    ALREADY_SCORED,
    ANONYMOUS,
    LEARNER,
    NOT_SHARED,
    REMEMBER_S,
    Evidence,
    FeedbackLearner,
    Scope,
    Served,
    in_scope,
)
from edgeroute.workers import worker as workers
from edgeroute.workers.local_state import SqliteState

log = logging.getLogger("edgeroute.learning")

SYNC_S = 0.5
LOOKUP_SLACK_S = 0.3  # the other process's batch write, on top of its period
LOOKUP_POLL_S = 0.1
MAX_PENDING = 100_000
_SEP = "\x1f"
_SEEDED = "learning-seeded"  # in the workers' file's `once` table


class LearnStore(Protocol):
    """Where the shared sums and served requests live; every call raises `StoreUnavailable`
    when the store cannot answer."""

    async def served(self, request_id: str) -> bytes | None: ...

    async def claim(self, request_id: str, record: bytes | None) -> Claim:
        """Whether `request_id` is claimed now: only the first caller's claim holds (for
        `REMEMBER_S`), and only while the store holds its record (`record`: this process's
        unsent one, written first)."""
        ...

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]], epoch: int) -> Wrote:
        """Keeps `served` (request id, record) and adds `sums` (field, increment), in one
        transaction; the sums not added when the store is not seeded, or has seen a reset
        since `epoch`."""
        ...

    async def sums(self) -> tuple[int, dict[str, float]]:
        """The store's epoch (how many resets it has seen) and its sums."""
        ...

    async def seed_sums(self, sums: dict[str, float], epoch: int) -> None:
        """Marks the store seeded, raises each of its sums to `sums`' where that is larger, and
        its epoch to `epoch` (a store that lost its data)."""
        ...

    async def reset(self, scope: Scope) -> int:
        """Removes the sums in `scope` and counts a reset; returns the new epoch."""
        ...

    async def close(self) -> None: ...


class Wrote(enum.IntEnum):
    ADDED = 1
    NOT_SEEDED = 0  # a store restarted empty (or never seeded): the writer seeds it, then writes again
    STALE = 2  # the store has seen a reset this process has not: its scores are from before it


class Claim(enum.IntEnum):
    CLAIMED = 1
    TAKEN = 0  # rated already (here or through another process)
    UNKNOWN = -1  # the store holds no record of it (expired, flushed): it may have counted


# The anonymous tenant's sums keep the hash and field names (task, route, a|b) of releases before
# tenants were kept, which read them alike; other tenants' (task, route, tenant, a|b) go to a
# hash of their own (KEYS[3]), which such a release never reads (its fields would not parse).
# Field, value pairs name their hash by a leading 1 (KEYS[1]) or 3 (KEYS[3]).
_SUMS = """
local function add(i, last)
  while i <= last do
    local field = ARGV[i]
    redis.call('HINCRBYFLOAT', KEYS[tonumber(string.sub(field, 1, 1))], string.sub(field, 2), ARGV[i + 1])
    i = i + 2
  end
end
"""

# KEYS[1]: the sums' hash, KEYS[2]: the seeded mark, KEYS[3]: the tenants' sums, KEYS[4]: the
# epoch; ARGV[1]: the seeder's epoch, then field, value... Each sum is raised to the value when
# that is larger: evidence only grows (but for a reset).
_SEED = """
redis.call('SET', KEYS[2], '1')
if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[4]) or '0') then redis.call('SET', KEYS[4], ARGV[1]) end
for i = 2, #ARGV, 2 do
  local h, field, value = KEYS[tonumber(string.sub(ARGV[i], 1, 1))], string.sub(ARGV[i], 2), tonumber(ARGV[i + 1])
  local have = tonumber(redis.call('HGET', h, field) or '0')
  if value > have then redis.call('HSET', h, field, ARGV[i + 1]) end
end
return 1
"""

# KEYS[1]: the request's record, KEYS[2]: its rated mark; ARGV[1]: a record to keep first (or
# ''), ARGV[2]: the time to live. 1 claimed, 0 rated already, -1 no record (see `Claim`).
_CLAIM = """
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""

# KEYS as `_SEED`'s; ARGV[1]: how many served requests, ARGV[2]: their time to live, ARGV[3]:
# the writer's epoch; then request key, record... and then field, increment... (see `Wrote`)
_WRITE = (
    _SUMS
    + """
local n, i = tonumber(ARGV[1]), 4
for _ = 1, n do
  redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ARGV[2])
  i = i + 2
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if tonumber(redis.call('GET', KEYS[4]) or '0') ~= tonumber(ARGV[3]) then return 2 end
add(i, #ARGV)
return 1
"""
)


# KEYS as `_SEED`'s; ARGV: the task, route and tenant field name to remove ('' for any), the
# anonymous tenant's name (its sums' fields name none). Returns the new epoch.
_RESET = """
local function split(s)
  local t, i = {}, 1
  while true do
    local j = string.find(s, '\\31', i, true)
    if not j then t[#t + 1] = string.sub(s, i) return t end
    t[#t + 1] = string.sub(s, i, j - 1)
    i = j + 1
  end
end
for _, h in ipairs({KEYS[1], KEYS[3]}) do
  for _, f in ipairs(redis.call('HKEYS', h)) do
    local p = split(f)
    local tenant = (#p == 4) and p[3] or ARGV[4]
    if (ARGV[1] == '' or p[1] == ARGV[1]) and (ARGV[2] == '' or p[2] == ARGV[2])
        and (ARGV[3] == '' or tenant == ARGV[3]) then
      redis.call('HDEL', h, f)
    end
  end
end
redis.call('SET', KEYS[2], '1')
return redis.call('INCR', KEYS[4])
"""


def _hashed(field: str) -> str:
    """`field` prefixed with the number of the hash it goes to (see `_SUMS`)."""
    return ("3" if field.count(_SEP) == 3 else "1") + field


class RedisLearnStore:
    def __init__(self, cfg: SharedState) -> None:
        timeout = cfg.timeout_ms / 1000
        self.client = redis_client.connect(
            cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
        )
        self.hash = f"{cfg.prefix}:learn:posteriors"
        self.mark = f"{cfg.prefix}:learn:seeded"
        self.tenants = f"{cfg.prefix}:learn:tenant-sums"
        self.epoch = f"{cfg.prefix}:learn:epoch"
        self.req_prefix = f"{cfg.prefix}:learn:req:"
        self.rated_prefix = f"{cfg.prefix}:learn:rated:"

    async def served(self, request_id: str) -> bytes | None:
        try:
            raw = await self.client.get(self.req_prefix + request_id)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None
        return raw.encode() if isinstance(raw, str) else raw

    async def claim(self, request_id: str, record: bytes | None) -> Claim:
        keys = (self.req_prefix + request_id, self.rated_prefix + request_id)
        try:
            return Claim(int(await self.client.eval(_CLAIM, 2, *keys, record or b"", REMEMBER_S)))
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]], epoch: int) -> Wrote:
        args: list[str | bytes | int] = [len(served), REMEMBER_S, epoch]
        args += [x for rid, value in served for x in (self.req_prefix + rid, value)]
        args += [x for field, delta in sums for x in (_hashed(field), repr(delta))]
        return Wrote(await self._eval(_WRITE, *args))

    async def sums(self) -> tuple[int, dict[str, float]]:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self.epoch)
                pipe.hgetall(self.hash)
                pipe.hgetall(self.tenants)
                epoch, got, tenants = await pipe.execute()
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None
        got |= tenants
        return int(epoch or 0), {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in got.items()}

    async def seed_sums(self, sums: dict[str, float], epoch: int) -> None:
        await self._eval(_SEED, epoch, *[x for field, value in sums.items() for x in (_hashed(field), repr(value))])

    async def reset(self, scope: Scope) -> int:
        task, route, tenant = scope
        tenant = tenant.replace(_SEP, " ") if tenant is not None else None  # as `_field` names it
        return await self._eval(_RESET, task or "", route or "", tenant or "", ANONYMOUS)

    async def _eval(self, script: str, *args: str | bytes | int) -> int:
        """`script` on the sums' keys (see `_SEED`); its number."""
        try:
            return int(await self.client.eval(script, 4, self.hash, self.mark, self.tenants, self.epoch, *args))
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def close(self) -> None:
        await self.client.aclose()


class SqliteLearnStore(SqliteState):
    """The same in a SQLite file shared by the workers of one machine (WAL, one `BEGIN
    IMMEDIATE` transaction each), a file of its own beside the budgets'."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS learn_sum (field TEXT PRIMARY KEY, value REAL NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS learn_req (id TEXT PRIMARY KEY, value BLOB NOT NULL, "
                "expires REAL NOT NULL) WITHOUT ROWID"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS learn_rated (id TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS learn_epoch (one INTEGER PRIMARY KEY CHECK (one = 1), n INT)")
            self._db.execute("INSERT OR IGNORE INTO learn_epoch VALUES (1, 0)")
        self._swept = 0.0

    async def served(self, request_id: str) -> bytes | None:
        def tx(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT value FROM learn_req WHERE id = ? AND expires > ?", (request_id, time.time()))
            got = row.fetchone()
            return None if got is None else bytes(got[0])

        return await self._run(tx)

    async def claim(self, request_id: str, record: bytes | None) -> Claim:
        def tx(db: sqlite3.Connection) -> Claim:
            now = time.time()
            if record is not None:
                db.execute("INSERT OR IGNORE INTO learn_req VALUES (?, ?, ?)", (request_id, record, now + REMEMBER_S))
            if db.execute("SELECT 1 FROM learn_req WHERE id = ? AND expires > ?", (request_id, now)).fetchone() is None:
                return Claim.UNKNOWN
            db.execute("DELETE FROM learn_rated WHERE id = ? AND expires <= ?", (request_id, now))
            cur = db.execute("INSERT OR IGNORE INTO learn_rated VALUES (?, ?)", (request_id, now + REMEMBER_S))
            return Claim.CLAIMED if cur.rowcount == 1 else Claim.TAKEN

        return await self._run(tx)

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]], epoch: int) -> Wrote:
        def tx(db: sqlite3.Connection) -> Wrote:
            now = time.time()
            if now - self._swept >= 60:  # expired requests and ratings, now and then
                self._swept = now
                db.execute("DELETE FROM learn_req WHERE expires <= ?", (now,))
                db.execute("DELETE FROM learn_rated WHERE expires <= ?", (now,))
            until = now + REMEMBER_S
            db.executemany("INSERT OR REPLACE INTO learn_req VALUES (?, ?, ?)", [(r, v, until) for r, v in served])
            if db.execute("SELECT 1 FROM once WHERE key = ?", (_SEEDED,)).fetchone() is None:
                return Wrote.NOT_SEEDED
            if _epoch(db) != epoch:
                return Wrote.STALE
            db.executemany(
                "INSERT INTO learn_sum VALUES (?, ?) ON CONFLICT (field) DO UPDATE SET value = value + excluded.value",
                sums,
            )
            return Wrote.ADDED

        return await self._run(tx)

    async def sums(self) -> tuple[int, dict[str, float]]:
        return await self._run(
            lambda db: (_epoch(db), {str(f): float(v) for f, v in db.execute("SELECT field, value FROM learn_sum")})
        )

    async def seed_sums(self, sums: dict[str, float], epoch: int) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO once VALUES (?, ?)", (_SEEDED, math.inf))
            db.execute("UPDATE learn_epoch SET n = max(n, ?)", (epoch,))
            db.executemany(
                "INSERT INTO learn_sum VALUES (?, ?) "
                "ON CONFLICT (field) DO UPDATE SET value = max(value, excluded.value)",
                list(sums.items()),
            )

        await self._run(tx)

    async def reset(self, scope: Scope) -> int:
        def tx(db: sqlite3.Connection) -> int:
            fields = [str(f) for (f,) in db.execute("SELECT field FROM learn_sum")]
            gone = [(f,) for f in fields if in_scope(scope, *_named(f)[:3])]
            db.executemany("DELETE FROM learn_sum WHERE field = ?", gone)
            db.execute("INSERT OR IGNORE INTO once VALUES (?, ?)", (_SEEDED, math.inf))
            db.execute("UPDATE learn_epoch SET n = n + 1")
            return _epoch(db)

        return await self._run(tx)


def _epoch(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT n FROM learn_epoch").fetchone()[0])


def _record(s: Served) -> list[object]:
    """What another process needs of a request: a keyless non-hit one a policy or experiment
    chose as releases before tenants were kept wrote it (which read three items), else whose it
    is, if a hit, the key's role and whether routing chose the route (older releases read the
    first six items)."""
    if s.key is None and s.team is None and not s.cached and s.chosen:
        return [s.route, s.task, s.cost_usd]
    return [s.route, s.task, s.cost_usd, s.key, s.team, s.cached, s.role, s.chosen]


def _field(task: str, route: str, tenant: str, which: str) -> str:
    """A sum's name: the anonymous tenant's as before tenants were kept (task, route, a|b)."""
    parts = (task, route, which) if tenant == ANONYMOUS else (task, route, tenant.replace(_SEP, " "), which)
    return _SEP.join(parts)


def _fields(evidence: dict[tuple[str, str], Evidence]) -> dict[str, float]:
    """The store's sums (by field name) for `evidence`."""
    out: dict[str, float] = {}
    for (task, route), by_tenant in evidence.items():
        for tenant, (a, b) in by_tenant.items():
            out[_field(task, route, tenant, "a")] = a
            out[_field(task, route, tenant, "b")] = b
    return out


def _named(field: str) -> tuple[str, str, str, str]:
    """(task, route, tenant, a|b) of a sum's name; one from before tenants were kept is the anonymous tenant's."""
    parts = field.split(_SEP)
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else (parts[0], parts[1], ANONYMOUS, parts[-1])


def _evidence(sums: dict[str, float]) -> dict[tuple[str, str], Evidence]:
    """The evidence in the store's sums; a sum from before tenants were kept is the anonymous tenant's."""
    found: dict[tuple[str, str], Evidence] = {}
    for name, value in sums.items():
        task, route, tenant, which = _named(name)
        by_tenant = found.setdefault((task, route), {})
        a, b = by_tenant.get(tenant, (0.0, 0.0))
        by_tenant[tenant] = (a + value, b) if which == "a" else (a, b + value)
    return found


Reward = tuple[str, str, str, float]  # task, route, tenant, reward


def _increments(rewards: list[Reward]) -> dict[str, float]:
    """The sums' increments for `rewards`, by field."""
    out: dict[str, float] = {}
    for task, route, tenant, reward in rewards:
        for which, value in (("a", reward), ("b", 1.0 - reward)):
            field = _field(task, route, tenant, which)
            out[field] = out.get(field, 0.0) + value
    return out


class LearningShare:
    def __init__(self, store: LearnStore, learner: FeedbackLearner) -> None:
        self.store = store
        self.learner = learner
        self.served: list[tuple[str, Served]] = []
        self.unsent: dict[str, Served] = {}  # served here, its record not yet in the store
        self.rewards: list[Reward] = []
        self.failed = 0

    def on_served(self, request_id: str, s: Served) -> None:
        if len(self.served) < MAX_PENDING:
            self.served.append((request_id, s))
            self.unsent[request_id] = s

    def on_feedback(self, s: Served, reward: float) -> None:
        if len(self.rewards) < MAX_PENDING:
            self.rewards.append((s.task, s.route, s.tenant, reward))

    async def lookup(self, request_id: str) -> Served | None:
        """A request another process served, or None (unknown, expired, or the store down). One
        served moments ago reaches the store with that process's next batch (every `SYNC_S`),
        so a miss is asked again until then: feedback sent right after the answer is not lost."""
        deadline = time.monotonic() + SYNC_S + LOOKUP_SLACK_S
        while True:
            try:
                raw = await self.store.served(request_id)
            except StoreUnavailable:
                self.failed += 1
                return None
            if raw is not None:
                break
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(LOOKUP_POLL_S)
        route, task, cost, *who = orjson.loads(raw)  # a record from before: no key, team, hit flag...
        key, team, cached, role, chosen = [*who, None, None, False, None, True][:5]
        return Served(str(route), str(task), float(cost), key, team, bool(cached), role=role, chosen=bool(chosen))

    async def claim(self, request_id: str) -> str | None:
        """None when this process is the first to rate `request_id` (one request moves the shared
        learner once, whichever processes its score reaches), else why not: rated already, or
        the store no longer holds the request (so its mark may be gone: not counted again).
        None when the store is down (this process's own memory decides, as without sharing)."""
        mine = self.unsent.get(request_id)  # served here moments ago: its record goes first
        try:
            got = await self.store.claim(request_id, orjson.dumps(_record(mine)) if mine is not None else None)
        except StoreUnavailable:
            self.failed += 1
            return None
        return None if got is Claim.CLAIMED else ALREADY_SCORED if got is Claim.TAKEN else NOT_SHARED

    def _floor(self) -> dict[str, float]:
        """What this process has counted and sent (or loaded, or synced): its sums less the scores
        not yet sent. The store never holds less of these unless it lost them."""
        floor = _fields(self.learner.evidence)
        for field, value in _increments(self.rewards).items():
            floor[field] = floor.get(field, 0.0) - value
        return floor

    async def seed(self, unsent: list[Reward] | None = None) -> None:
        """Raises the store's sums to this process's where they are larger (and marks it seeded):
        at start, those it loaded; for a store restarted empty, those it routes with, less the
        scores it has not sent (`unsent`, the batch being sent, and those since), which its
        next write adds."""
        floor = self._floor()
        for field, value in _increments(unsent or []).items():
            floor[field] = floor.get(field, 0.0) - value
        await self.store.seed_sums(floor, self.learner.epoch)

    async def start(self) -> None:
        """At start: a store that has seen a reset since this process's state file was saved is
        taken as it is (the file's evidence dropped, not seeded back); else `seed`."""
        epoch, sums = await self.store.sums()
        if epoch > self.learner.epoch:
            self._adopt(epoch, sums)
        await self.seed()

    def _adopt(self, epoch: int, sums: dict[str, float]) -> None:
        """Takes the store's sums as they are after a reset (epoch `epoch`): this process's
        evidence and its unsent scores, all from before it, are dropped."""
        if self.rewards:
            log.info("shared learning: %d feedback scores from before a learning reset not counted", len(self.rewards))
        self.rewards = []
        self.learner.adopt(_evidence(sums), epoch)

    async def reset(self, scope: Scope) -> None:
        """An admin's reset: the sums in `scope` removed fleet-wide, and taken here at once."""
        self.rewards = [r for r in self.rewards if not in_scope(scope, *r[:3])]
        await self.flush()  # the other scores pending here count (as of the epoch before)
        await self.store.reset(scope)
        await self.sync()

    async def flush(self) -> None:
        served, rewards = self.served, self.rewards
        if not served and not rewards:
            return
        self.served, self.rewards = [], []
        records = [(rid, orjson.dumps(_record(s))) for rid, s in served]
        sums = list(_increments(rewards).items())
        try:
            wrote = await self.store.write(records, sums, self.learner.epoch)
            if wrote is Wrote.NOT_SEEDED:  # a store restarted empty (or never seeded)
                await self.seed(rewards)
                wrote = await self.store.write([], sums, self.learner.epoch)
            if wrote is Wrote.STALE:  # scored before a reset this process has not seen: not counted
                log.info("shared learning: %d feedback scores from before a learning reset not counted", len(rewards))
        except StoreUnavailable:
            # Requests are sent again (keeping one twice is harmless); rewards are not, since a
            # transaction that timed out may have applied, and a reward must not count twice.
            self.failed += 1
            self.served = served + self.served
            for rid, _ in self.served[MAX_PENDING:]:
                self.unsent.pop(rid, None)
            del self.served[MAX_PENDING:]
            log.warning("shared learning: %d feedback scores not shared (store unavailable)", len(rewards))
            raise
        for rid, _ in served:
            self.unsent.pop(rid, None)

    async def sync(self) -> None:
        """Reads the shared sums back. Evidence never shrinks: a sum below what this process
        counted (a store restarted empty, then seeded by a process that knew less) is raised in
        the store to this process's, and this process keeps its own; but after a reset (a
        newer epoch) the store's sums are taken as they are."""
        epoch, sums = await self.store.sums()
        if epoch > self.learner.epoch:
            self._adopt(epoch, sums)
            return
        if epoch < self.learner.epoch or any(sums.get(f, 0.0) < v - 1e-9 for f, v in self._floor().items()):
            await self.store.seed_sums(self._floor(), self.learner.epoch)
        floor, pending = self._floor(), _increments(self.rewards)
        merged = {f: max(sums.get(f, 0.0), floor.get(f, 0.0)) + pending.get(f, 0.0) for f in sums.keys() | floor.keys()}
        self.learner.set_evidence(_evidence(merged))

    async def run(self) -> None:
        try:
            await self.start()
        except StoreUnavailable as e:
            log.warning("shared learning: store unavailable at start (%s): not seeded from the state file", e)
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self.flush()
                await self.sync()
            except StoreUnavailable as e:
                log.warning("shared learning: store unavailable (%s)", e)

    async def close(self) -> None:
        """Sends what is pending and reads the sums once more, for the state file's last save."""
        with contextlib.suppress(StoreUnavailable):
            await self.flush()
            await self.sync()
        await self.store.close()


def _store(config: Config) -> LearnStore | None:
    if config.shared_state is not None:
        return RedisLearnStore(config.shared_state)
    worker = workers.current()
    if worker is not None and worker.count > 1:
        return SqliteLearnStore(worker.dir / "learning.db")
    return None


def install(app: web.Application, config: Config) -> None:
    """With a feedback learner and `shared_state` or sibling workers, shares it (call after
    `learning.install`)."""
    learner = app.get(LEARNER)
    if learner is None or (store := _store(config)) is None:
        return
    share = LearningShare(store, learner)
    learner.share = share

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(share.run())
        yield
        await background.stop(task)  # its Redis calls can swallow one cancel() (Python 3.11)
        await share.close()

    app.cleanup_ctx.append(lifecycle)
