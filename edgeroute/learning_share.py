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
    Served,
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

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]]) -> bool:
        """Keeps `served` (request id, record) and adds `sums` (field, increment), in one
        transaction; False, and the sums not added, when the store is not seeded."""
        ...

    async def sums(self) -> dict[str, float]: ...

    async def seed_sums(self, sums: dict[str, float]) -> None:
        """Marks the store seeded and raises each of its sums to `sums`' where that is larger."""
        ...

    async def close(self) -> None: ...


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

# KEYS[1]: the sums' hash, KEYS[2]: the seeded mark, KEYS[3]: the tenants' sums; ARGV: field,
# value... Each sum is raised to the value when that is larger: evidence only grows.
_SEED = """
redis.call('SET', KEYS[2], '1')
for i = 1, #ARGV, 2 do
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

# KEYS as `_SEED`'s; ARGV[1]: how many served requests, ARGV[2]: their time to live; then
# request key, record... and then field, increment...
_WRITE = (
    _SUMS
    + """
local n, i = tonumber(ARGV[1]), 3
for _ = 1, n do
  redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', ARGV[2])
  i = i + 2
end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
add(i, #ARGV)
return 1
"""
)


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

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]]) -> bool:
        args: list[str | bytes | int] = [len(served), REMEMBER_S]
        args += [x for rid, value in served for x in (self.req_prefix + rid, value)]
        args += [x for field, delta in sums for x in (_hashed(field), repr(delta))]
        try:
            return bool(await self.client.eval(_WRITE, 3, self.hash, self.mark, self.tenants, *args))
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None

    async def sums(self) -> dict[str, float]:
        try:
            got = await self.client.hgetall(self.hash)
            got |= await self.client.hgetall(self.tenants)
        except redis_client.errors() as e:
            raise StoreUnavailable(type(e).__name__) from None
        return {(k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in got.items()}

    async def seed_sums(self, sums: dict[str, float]) -> None:
        args = [x for field, value in sums.items() for x in (_hashed(field), repr(value))]
        try:
            await self.client.eval(_SEED, 3, self.hash, self.mark, self.tenants, *args)
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

    async def write(self, served: list[tuple[str, bytes]], sums: list[tuple[str, float]]) -> bool:
        def tx(db: sqlite3.Connection) -> bool:
            now = time.time()
            if now - self._swept >= 60:  # expired requests and ratings, now and then
                self._swept = now
                db.execute("DELETE FROM learn_req WHERE expires <= ?", (now,))
                db.execute("DELETE FROM learn_rated WHERE expires <= ?", (now,))
            until = now + REMEMBER_S
            db.executemany("INSERT OR REPLACE INTO learn_req VALUES (?, ?, ?)", [(r, v, until) for r, v in served])
            if db.execute("SELECT 1 FROM once WHERE key = ?", (_SEEDED,)).fetchone() is None:
                return False
            db.executemany(
                "INSERT INTO learn_sum VALUES (?, ?) ON CONFLICT (field) DO UPDATE SET value = value + excluded.value",
                sums,
            )
            return True

        return await self._run(tx)

    async def sums(self) -> dict[str, float]:
        return await self._run(
            lambda db: {str(f): float(v) for f, v in db.execute("SELECT field, value FROM learn_sum")}
        )

    async def seed_sums(self, sums: dict[str, float]) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO once VALUES (?, ?)", (_SEEDED, math.inf))
            db.executemany(
                "INSERT INTO learn_sum VALUES (?, ?) "
                "ON CONFLICT (field) DO UPDATE SET value = max(value, excluded.value)",
                list(sums.items()),
            )

        await self._run(tx)


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


def _evidence(sums: dict[str, float]) -> dict[tuple[str, str], Evidence]:
    """The evidence in the store's sums; a sum from before tenants were kept is the anonymous tenant's."""
    found: dict[tuple[str, str], Evidence] = {}
    for name, value in sums.items():
        parts = name.split(_SEP)
        task, route, tenant, which = parts if len(parts) == 4 else (parts[0], parts[1], ANONYMOUS, parts[-1])
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
        await self.store.seed_sums(floor)

    async def flush(self) -> None:
        served, rewards = self.served, self.rewards
        if not served and not rewards:
            return
        self.served, self.rewards = [], []
        records = [(rid, orjson.dumps(_record(s))) for rid, s in served]
        sums = list(_increments(rewards).items())
        try:
            if not await self.store.write(records, sums):  # a store restarted empty (or never seeded)
                await self.seed(rewards)
                await self.store.write([], sums)
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
        the store to this process's, and this process keeps its own."""
        sums = await self.store.sums()
        if any(sums.get(f, 0.0) < v - 1e-9 for f, v in self._floor().items()):
            await self.store.seed_sums(self._floor())
        floor, pending = self._floor(), _increments(self.rewards)
        merged = {f: max(sums.get(f, 0.0), floor.get(f, 0.0)) + pending.get(f, 0.0) for f in sums.keys() | floor.keys()}
        self.learner.set_evidence(_evidence(merged))

    async def run(self) -> None:
        try:
            await self.seed()
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
