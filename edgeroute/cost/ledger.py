"""The spend ledger: one row per request (and per attempt), in SQLite or PostgreSQL.

`record()` only appends to a deque (thread-safe, no I/O, no conversion): a writer
thread turns the records into rows and writes them in one transaction, early enough that
every record is committed within `flush_interval` of being recorded: batches are taken
often enough to leave room for their own write (`writer_pace`), and at once when a burst
fills the queue. So a crash
(SIGKILL) loses at most the records of the last interval as long as the store keeps up
(`python -m edgeroute.bench.requestlog writes` and `crash` measure it); a graceful
shutdown (`close()`, hooked into the app's cleanup) loses none.
SQLite runs in WAL mode with `synchronous=NORMAL`: a committed batch survives the
process dying (not the OS crashing, which needs `FULL`).

When a batch fails, the ledger tells the store being unavailable (down, locked, full,
the connection lost: the batch is kept and retried at the next flush) from the store
rejecting data (`rejects_row`: a value out of range, a constraint): then it writes the
batch row by row, so the good rows land and the rows that still fail are *set aside*:
logged at ERROR with every column (enough to re-enter the spend by hand) and counted in
`Ledger.set_aside`. An error it cannot classify counts as the store being unavailable,
so nothing is set aside on a guess. `close()` keeps retrying for `close_timeout` seconds;
what it still cannot write is logged the same way and counted in `lost_at_close`.

Writes are idempotent: each row gets a writer-generated `row_id` (unique) and each batch
an id recorded in `ledger_batches` in the same transaction, so when PostgreSQL commits a
batch but the acknowledgement is lost, the retry of that same batch writes nothing twice
(not even the request log's additive rollups). A batch that failed is retried as it was,
before anything newer. Databases made before row ids are migrated at start (a column and
a unique index are added; old rows keep a NULL id).

The same writer, in the same transactions, writes the request log (`edgeroute.requestlog`:
one row per request with its attempts timeline, and per-minute rollups) when it is on,
and the reservation journal (`journal()`: what admission reserved, so that a restart
counts the requests that were in flight at a crash as spent); it also runs the request
log's retention every minute.

Rows hold ids and numbers only: the key's id, never its token. `baseline_cost_usd` is
what the same usage would have cost on the route's most expensive deployment (for the
savings report), computed in the writer thread, off the request path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edgeroute.accounting import RequestRecord, Usage, cost_of
from edgeroute.background import lower_priority
from edgeroute.config import Config, Price
from edgeroute.config import Ledger as LedgerConfig
from edgeroute.cost import spend_once
from edgeroute.cost.ledger_store import (
    ATTEMPT_COLUMNS,
    CHUNK_ROWS,
    COLUMNS,
    Backend,
    Batch,
    Row,
    backend_for,
    rejects_row,
)
from edgeroute.cost.prices import most_expensive
from edgeroute.cost.writer_breath import Breather, never
from edgeroute.cost.writer_pace import WriterPace
from edgeroute.requestlog import rollup
from edgeroute.requestlog import rows as requestlog_rows
from edgeroute.requestlog import store as requestlog_store
from edgeroute.requestlog.settings import RequestLog

log = logging.getLogger("edgeroute.ledger")


def _tokens(u: Usage | None) -> tuple[int, int, int, int]:
    if u is None:
        return 0, 0, 0, 0
    return u.prompt_tokens, u.completion_tokens, u.cached_tokens, int(u.estimated)


@functools.lru_cache(maxsize=8)
def _day(n: int) -> str:
    """The UTC date of day `n` since the epoch (formatted once a day, not once a row)."""
    return time.strftime("%Y-%m-%d", time.gmtime(n * 86400))


_ALL_MINUTES = 2**62  # a `before` past any minute
_SPREAD_ROWS = 1000  # pending rollup rows a spread may always move (see Ledger._spread_pending)
_SPREAD_STEP = 16  # pending rows a SQLite spread's transaction moves (~1 ms of CPU), with a rest after it
_MAINTAIN_EVERY = 60.0  # seconds between the full retention runs (rollups, batch ids, reservations)
# A writer that has not finished a flush for this many intervals (at least `STALL_FLOOR_S`) is
# failing as one whose writes raise is: a database that stops answering raises nothing.
STALL_INTERVALS = 4
STALL_FLOOR_S = 3.0
# Records held in memory while the store cannot write, at most: past it the oldest are logged
# instead (every column, as a set-aside record) and counted in `Ledger.spilled`.
MAX_HELD = 100_000
_WATCH_S = 0.5  # how often the watcher looks at the writer
T = TypeVar("T")


@dataclasses.dataclass(slots=True)
class _Pending:
    """A record and its rows, ready for the store; `row_id` is its id in every table."""

    rec: RequestRecord
    row: Row
    attempts: list[Row]
    request: Row | None = None
    baseline: float = 0.0


@dataclasses.dataclass(slots=True)
class _Held:
    """One batch as first built: a failed batch is retried exactly so (same ids)."""

    batch_id: str
    pending: list[_Pending]
    journal: list[Row]
    outcomes: list[tuple[str, Row]] = dataclasses.field(default_factory=list)

    def batch(self, log_on: bool, levels: Sequence[int] = rollup.LEVELS, rest: Callable[[], None] = never) -> Batch:
        """The batch to write; its rollup rows at `levels` (the backend's `rollup_levels`),
        aggregated with a `rest` every `CHUNK_ROWS` records."""
        live = ((p.rec, p.baseline) for p in _resting(self.pending, rest) if p.rec.shadow_of is None)
        return Batch(
            self.batch_id,
            [p.row for p in self.pending],
            [a for p in self.pending for a in p.attempts],
            [p.request for p in self.pending if p.request is not None],
            rollup.aggregate(live, levels) if log_on else [],
            self.journal,
            self.outcomes,
        )


def _resting(items: Iterable[T], rest: Callable[[], None]) -> Iterator[T]:
    """`items`, with a `rest` after every `CHUNK_ROWS` of them (the writer's CPU in slices)."""
    for i, item in enumerate(items, 1):
        yield item
        if i % CHUNK_ROWS == 0:
            rest()


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class Ledger:
    """A `Recorder` that writes to a backend from a thread, in batches.

    Counters: `written` (requests in the store), `failed_batches` (writes that failed and
    were kept for later), `set_aside` (records the store rejected, logged instead),
    `lost_at_close` (records `close()` could not write: the store stayed unavailable) and
    `log_dropped` (request-log rows skipped over the backlog bound; spend still written),
    `spilled` (records logged instead of held: `MAX_HELD` were waiting already), and
    `already_recorded` (records not written, their request having a row already: `spend_once`).

    The store is failing (`failing_since`) from a write that raised until one succeeds, and
    also while the writer has not finished a flush for `stall_s` (a database that does not
    answer): a thread of its own watches for that, since the writer is the one stuck.
    """

    def __init__(
        self,
        backend: Backend,
        flush_interval: float = 0.5,
        record_attempts: bool = True,
        baseline: dict[str, Price] | None = None,
        close_timeout: float = 5.0,
        request_log: RequestLog | None = None,
        low_priority: bool = False,
        on_unavailable: str = "open",
    ) -> None:
        self.backend = backend
        self.on_unavailable = on_unavailable  # only for what the log says: the server refuses
        self.low_priority = low_priority
        self.flush_interval = flush_interval
        self.record_attempts = record_attempts
        self.baseline = baseline or {}
        self.close_timeout = close_timeout
        self.request_log = request_log if request_log is not None and request_log.enabled else None
        self._levels: Sequence[int] = getattr(backend, "rollup_levels", rollup.LEVELS)
        # A backend that takes a batch's rollups as pending minute rows spreads them over the
        # levels when asked (`rollup.spread_sql`): once a minute, when a batch holds a newer one.
        self._spread = getattr(backend, "spread", None) if tuple(self._levels) == (rollup.PENDING,) else None
        self._newest_minute = 0  # the newest minute of a record written
        self._spread_before = 0  # pending rows before this minute were spread (by this writer)
        self._rollup_rows = 0  # rollup rows the last flush wrote: a spread moves at most twice as many
        self._spread_told = -1e9
        self._queue: collections.deque[RequestRecord] = collections.deque()
        self._journal: collections.deque[Row] = collections.deque()
        self._outcomes: collections.deque[tuple[str, Row]] = collections.deque()
        self._retry: list[_Held] = []
        # Records whose settlement waits for Redis (`cost.control.liveness`): written once it is
        # decided (`release`), and counted meanwhile as this process's unwritten spend.
        self._held: dict[str, RequestRecord] = {}
        self._writer_id = os.urandom(6).hex()
        self._seq = itertools.count(1)
        # Called before each flush, outside the writer's lock (`cost.control.liveness` makes sure
        # this run's records are still its own to write).
        self.before_flush: Callable[[], None] | None = None
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one flush at a time (thread vs. an explicit flush)
        self._maintained = 0.0
        self._pace = WriterPace(flush_interval)  # updated by the writer thread only
        self._breath = Breather(flush_interval)  # rests the writer thread alone takes
        self._inflight = 0  # records taken from the queue whose batch is not committed yet
        self.written = 0
        self.failed_batches = 0
        self.set_aside = 0
        self.already_recorded = 0  # rows not written: their request had one already (`spend_once`)
        self.lost_at_close = 0
        # Since when (monotonic) the store has refused every write: records pile up in memory
        # meanwhile, all of them lost to a kill -9, so `/readyz` says so (None: writing).
        self._failed_since: float | None = None
        self._failed_why = ""
        self._fail_told = 0.0
        self.stall_s = max(STALL_FLOOR_S, STALL_INTERVALS * flush_interval)
        self._flushed = time.monotonic()  # when a flush last finished (written or failed)
        self.spilled = 0
        self._halt = threading.Event()
        self.log_dropped = 0  # request-log rows not written: over the backlog bound
        self.writer_cpu_s = 0.0  # CPU time the writer spent flushing (its share of the GIL, mostly)
        self._drop_warned = -1e9
        self._thread = threading.Thread(target=self._run, name="edgeroute-ledger", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="edgeroute-ledger-watch", daemon=True)
        self._watcher.start()

    @property
    def failing_since(self) -> float | None:
        """Since when (monotonic) the store has not taken a write: the first failure of a write
        that raised, or the end of the last flush once the one after it has taken `stall_s`."""
        if self._failed_since is not None:
            return self._failed_since
        flushed = self._flushed
        return flushed if time.monotonic() - flushed > self.stall_s else None

    def failing_why(self) -> str | None:
        """Why the ledger is not writing, for `/readyz` (no error text: it may name hosts)."""
        if (since := self.failing_since) is None:
            return None
        if self._failed_since is not None:
            return f"its writes fail ({self._failed_why})"
        return f"a write has not completed for {time.monotonic() - since:.1f} s (the database does not answer)"

    # the hot path: an append (and, once per burst, a wake-up)
    def record(self, rec: RequestRecord) -> None:
        if rec.held_back:  # recorded once its settlement is decided (`cost.control.liveness`)
            self._held[rec.request_id] = rec
            return
        q = self._queue
        q.append(rec)
        if len(q) == self._pace.wake_rows:
            self._wake.set()

    def journal(self, request_id: str, ts: float, store_key: str, amount_nano: int) -> None:
        """Notes a budget reservation (an append), written with the next batch."""
        self._journal.append((request_id, ts, store_key, amount_nano))

    def journal_all(self, request_id: str, ts: float, amounts: Iterable[tuple[str, int]]) -> None:
        """Notes a request's reservations or takes (store key, amount), written in one batch: one
        `extend`, which the writer thread cannot take half of (row by row, it took a request's
        requests row in one batch and its tokens row in the next, and a crash between the two
        counted the request against RPM alone after the restart)."""
        self._journal.extend([(request_id, ts, key, amount) for key, amount in amounts])

    def outcome(self, table: str, row: Row) -> None:
        """Queues a row of a `requestlog.outcomes` table (an append), written with the next batch."""
        self._outcomes.append((table, row))

    def queue_depth(self) -> int:
        """Records not in the store yet: waiting, in the batch being written, or kept from
        failed batches (what a crash at this moment would lose)."""
        return len(self._queue) + self._inflight + sum(len(h.pending) for h in self._retry) + len(self._held)

    def unwritten(self, wait: float) -> tuple[list[RequestRecord], list[Row]] | None:
        """This process's records and journal rows (request id, ts, store key, amount) not in
        the store yet: kept from failed batches, and waiting. None when a flush held the writer
        for `wait` seconds (a batch under way is in neither)."""
        if not self._lock.acquire(timeout=wait):
            return None
        try:
            held = list(self._held.values())  # one C call: the loop cannot change it meanwhile
            records = [p.rec for h in self._retry for p in h.pending] + list(self._queue) + held
            journal = [j[1:] for h in self._retry for j in h.journal] + list(self._journal)
            return records, journal
        finally:
            self._lock.release()

    def withdraw(self, wait: float) -> list[RequestRecord] | None:
        """Takes the records waiting for the next batch out of the queue; None when a flush held
        the writer for `wait` seconds. (This instance's liveness lapsed: another instance may
        have recorded some of them as crashed meanwhile, `cost.control.liveness`.)"""
        if not self._lock.acquire(timeout=wait):
            return None
        try:
            taken = _take_all(self._queue)
        finally:
            self._lock.release()
        for rec in taken:  # still this process's spend until decided: a refill counts them
            rec.held_back = True
            self._held[rec.request_id] = rec
        return taken

    def release(self, rec: RequestRecord, *, write: bool) -> None:
        """A held record's settlement is decided: written (`write`), or not (another instance
        recorded the request as crashed)."""
        self._held.pop(rec.request_id, None)
        rec.held_back = False
        if write:
            self.record(rec)

    def _run(self) -> None:
        if self.low_priority:  # a flush waits for the loop, never the other way round
            lower_priority()
        taken = time.monotonic()  # when the last batch was taken from the queue
        while not self._stop:
            self._wake.wait(max(0.0, taken + self._pace.period_s - time.monotonic()))
            self._wake.clear()
            start = time.monotonic()
            n = len(self._queue)
            self._breath.begin()
            try:
                self.flush()
                if (checkpoint := getattr(self.backend, "checkpoint", None)) is not None:  # SQLite's WAL
                    self._breath.rest()
                    with self._lock:
                        checkpoint()
                if self.request_log is not None:  # retention a little at a time: no long delete
                    self._breath.rest()
                    with self._lock:
                        requestlog_store.prune_some(
                            self.backend, self.request_log, max(1000, 2 * n), rest=self._breath.rest
                        )
                if time.monotonic() - self._maintained >= _MAINTAIN_EVERY:
                    self._maintained = time.monotonic()
                    self.maintain(budget=max(1000, 2 * n))
            except Exception:  # a bug must not stop the writer: the next flush tries again
                log.exception("ledger flush failed")
            self._pace.cycle(n, start - taken, time.monotonic() - start)
            taken = start

    def maintain(self, now: float | None = None, budget: int | None = None) -> None:
        """Retention: the request log's (days, size cap; at most `budget` request rows), batch
        ids past any retry, and settled reservations."""
        now = time.time() if now is None else now
        rest = self._breath.rest
        with self._lock:
            if self.request_log is not None:
                requestlog_store.prune(self.backend, self.request_log, now, budget, rest)
            self.backend.execute("DELETE FROM ledger_batches WHERE ts < ?", (now - 3 * 86400,))
            rest()
            settled = "EXISTS (SELECT 1 FROM spend WHERE spend.request_id = reservations.request_id)"
            self.backend.execute(f"DELETE FROM reservations WHERE ts < ? AND {settled}", (now - 600,))
            rest()
            self.backend.execute("DELETE FROM reservations WHERE ts < ?", (now - 400 * 86400,))

    def _next_id(self) -> str:
        return f"{self._writer_id}-{next(self._seq):x}"

    @property
    def writer_id(self) -> str:
        """The prefix of the row ids this writer gives (a run, to `cost.control.liveness`)."""
        return self._writer_id

    def new_writer_id(self) -> str:
        """Gives the rows written from now on ids of a new prefix (a new run), and returns it."""
        self._writer_id = os.urandom(6).hex()  # one assignment: the writer thread reads it whole
        return self._writer_id

    def flush(self) -> int:
        """Writes everything queued so far; returns the number of requests written.

        A batch the store could not take (unavailable) is kept and retried first, as it was.
        If the store rejects a batch, it is written row by row and the rows it still
        rejects are set aside (logged and counted), so one bad record cannot block the others."""
        if (check := self.before_flush) is not None:
            check()
        cpu = time.thread_time()
        try:
            return self._flush()
        finally:
            self._flushed = time.monotonic()
            self.writer_cpu_s += time.thread_time() - cpu

    def _flush(self) -> int:
        with self._lock:
            done = 0
            while self._retry:
                n = self._write(self._retry[0], retry=True)
                if n is None:
                    return done
                done += n
                self._retry.pop(0)
            batch = _take_all(self._queue)
            journal: list[Row] = []
            while self._journal:
                journal.append((self._next_id(), *self._journal.popleft()))
            # Over the request log's backlog bound, the oldest records keep their spend and
            # rollups but not their request-log row (see RequestLog.max_backlog).
            over = len(batch) - self.request_log.max_backlog if self.request_log is not None else 0
            if over > 0:
                self.log_dropped += over
                if time.monotonic() - self._drop_warned > 60:  # once a minute, not every flush
                    self._drop_warned = time.monotonic()
                    log.warning("request log: %d records behind; %d written without their row", len(batch), over)
            outcomes: list[tuple[str, Row]] = []
            while self._outcomes:
                outcomes.append(self._outcomes.popleft())
            self._inflight = len(batch)
            try:
                pending = [
                    p for i, r in _resting(enumerate(batch), self._breath.rest)
                    if (p := self._pending(r, i >= over)) is not None
                ]  # fmt: skip
                if pending or journal or outcomes:
                    n = self._write(_Held(self._next_id(), pending, journal, outcomes))
                    done += n or 0
            finally:
                self._inflight = 0
            if not self._retry:
                self._failed_since = None
            if self._newest_minute > self._spread_before:
                self._breath.rest()
                self._spread_pending(self._newest_minute)
            self._rollup_rows = 0
            return done

    def _spread_pending(self, before: int) -> bool:
        """Spreads pending rollup rows of the minutes before `before` over the levels (the
        stats are exact either way: this keeps the pending rows few, so queries stay fast);
        False when more are left to spread. At most twice the rows the flush wrote (and at least
        `_SPREAD_ROWS`) at a time: a minute of many keys is spread over the next flushes rather
        than in one long transaction that would hold up the writer past its flush interval,
        and the spreads still keep up, as no flush adds more pending rows than it wrote."""
        if self._spread is None:
            return True
        limit = max(_SPREAD_ROWS, 2 * self._rollup_rows)
        # SQLite: in steps, a transaction each, with a rest between (a row takes ~50 µs of
        # the writer's CPU). PostgreSQL spreads on its own CPU, and a step there costs round
        # trips and a commit (673 rows: 83 ms in one transaction, 237 ms in steps of 16).
        most = _SPREAD_STEP if self.backend.dialect == "sqlite" else limit
        spread = 0
        while spread < limit:
            step = min(most, limit - spread)
            try:
                moved = self._spread(before, step)
            except Exception as e:  # tried again after the next batch
                if time.monotonic() - self._spread_told > 60:
                    self._spread_told = time.monotonic()
                    log.warning("request log: spreading the pending rollup rows failed (%s); tried again later", e)
                return True  # nothing more to try now
            spread += moved
            if moved < step:
                self._spread_before = before
                return True
            self._breath.rest()
        return False

    def _write(self, held: _Held, retry: bool = False) -> int | None:
        """Writes a batch; the number of requests written, or None when the store is unavailable
        (the batch is then kept for the next flush)."""
        try:
            batch = self._store(held, self._breath.rest)
        except Exception as e:
            if not rejects_row(e):
                self._keep(held, e, retry)
                return None
            log.warning("ledger: the store rejected a batch of %d (%s); writing it row by row", len(held.pending), e)
            return self._write_one_by_one(held, retry)
        self.written += len(held.pending)
        self._rollup_rows += len(batch.rollup)
        self._note_minutes(held.pending)
        return len(held.pending)

    def _store(self, held: _Held, rest: Callable[[], None] = never) -> Batch:
        """Writes `held`'s batch, without the rows of requests another row records already
        (`spend_once`: the store rolled the batch back and named them); the batch written."""
        while True:
            batch = held.batch(self.request_log is not None, self._levels, rest)
            try:
                self.backend.write(batch, rest=rest)
                return batch
            except spend_once.AlreadyRecorded as e:
                for p in held.pending:
                    if p.row[-1] in e.row_ids:
                        self.already_recorded += 1
                        log.warning(
                            "ledger: request %s has a spend row already (another instance's: the `crashed` row of one"
                            " that took this instance's run over while it was paused or cut off from Redis, or the"
                            " request's own); this %s row ($%.6f) is not written, so the request counts once",
                            p.rec.request_id, p.rec.outcome, p.rec.cost_usd,
                        )  # fmt: skip
                left = [p for p in held.pending if p.row[-1] not in e.row_ids]
                if len(left) == len(held.pending):  # named none of the batch's rows: never loop on it
                    raise
                held.pending = left

    def _note_minutes(self, pending: list[_Pending]) -> None:
        if pending:
            self._newest_minute = max(self._newest_minute, int(max(p.rec.started for p in pending) // 60))

    def _write_one_by_one(self, held: _Held, retry: bool) -> int | None:
        done = 0
        side = held.journal or held.outcomes
        parts = [_Held(f"{held.batch_id}/j", [], held.journal, held.outcomes)] if side else []
        parts += [_Held(f"{held.batch_id}/{i}", [p], []) for i, p in enumerate(held.pending)]
        for i, part in enumerate(parts):
            try:
                batch = self._store(part)
            except Exception as e:
                if rejects_row(e):
                    for p in part.pending:
                        self._set_aside(p.rec, p.row, p.attempts, e)
                    if not part.pending:
                        log.error("ledger: the store rejected journal or outcome rows: %s %s (%s)",
                                  part.journal, part.outcomes, e)  # fmt: skip
                    continue
                # The part that failed is kept under its own id: its commit may have landed with
                # the acknowledgement lost, and only the same id makes the retry write nothing.
                # The parts not tried yet go together, under a new one.
                self._keep(part, e, retry)
                if rest := parts[i + 1 :]:
                    self._retry.append(_Held(f"{held.batch_id}/r{i}", [p for r in rest for p in r.pending],
                                             [j for r in rest for j in r.journal],
                                             [o for r in rest for o in r.outcomes]))  # fmt: skip
                if retry:
                    self._retry.pop(0)  # replaced by what is left of it, at the end of the queue
                self.written += done
                return None
            done += len(part.pending)
            self._rollup_rows += len(batch.rollup)
            self._note_minutes(part.pending)
        self.written += done
        return done

    def _keep(self, held: _Held, exc: Exception, retry: bool) -> None:
        """The store is unavailable: keep the batch for the next flush rather than lose spend."""
        self.failed_batches += 1
        now = time.monotonic()
        self._failed_why = type(exc).__name__
        if self._failed_since is None:  # once per outage with its traceback, then a line every 10 s
            self._failed_since = self._fail_told = now
            log.error("ledger write failed; %d records kept for the next flush", len(held.pending), exc_info=exc)
        elif now - self._fail_told >= 10.0:
            self._fail_told = now
            log.error(
                "ledger write still failing after %.0f s (%s); %d records in memory, lost if the process is killed",
                now - self._failed_since, exc, self.queue_depth(),
            )  # fmt: skip
        if not retry:
            self._retry.append(held)
        elif held.batch_id != self._retry[0].batch_id:
            self._retry.append(held)

    def _watch(self) -> None:
        """Tells (log) when the writer has been stuck past `stall_s` and when it writes again, and
        keeps what waits in memory under `MAX_HELD`: the writer cannot, being the one stuck."""
        stuck = False
        while not self._halt.wait(_WATCH_S):
            try:
                stuck = self._tell_stall(stuck)
                self._spill(self.queue_depth() - MAX_HELD)
            except Exception:  # a bug must not end the watch
                log.exception("ledger watch failed")

    def _tell_stall(self, was: bool) -> bool:
        """Logs a stall's start (then every 10 s; `_keep` tells a write that raised) and the end
        of any failure; whether the ledger is failing now."""
        since = self.failing_since
        now = time.monotonic()
        if since is None:
            if was:
                log.warning("ledger: writing again; the records held in memory are being written")
            return False
        if self._failed_since is None and (not was or now - self._fail_told >= 10.0):
            self._fail_told = now
            then = "requests that could spend are refused (503)" if self.on_unavailable == "closed" else "served on"
            log.error(
                "ledger write has not completed for %.0f s (the database does not answer); %d records in memory,"
                " lost if the process is killed; %s (ledger.on_unavailable: %s)",
                now - since, self.queue_depth(), then, self.on_unavailable,
            )  # fmt: skip
        return True

    def _spill(self, over: int) -> None:
        """Logs the `over` oldest waiting records instead of holding them (the store cannot write
        and `MAX_HELD` wait): their spend stays in the log, and memory stays bounded."""
        for rec in _take_all(self._queue, over):
            self.spilled += 1
            log.error("ledger: not held, %d records wait unwritten already: %s", MAX_HELD, _describe(rec, None, []))

    def _set_aside(self, rec: RequestRecord, row: Row | None, attempts: list[Row], exc: BaseException) -> None:
        """Logs a record the store will not take, with every column (ids and numbers only,
        never a key's token), so its spend can be re-entered; counts it in `set_aside`."""
        self.set_aside += 1
        log.error(
            "ledger: set aside request %s, which cannot be written (%s: %s): %s",
            rec.request_id,
            type(exc).__name__,
            exc,
            _describe(rec, row, attempts),
        )

    def _pending(self, rec: RequestRecord, log_row: bool = True) -> _Pending | None:
        try:
            return self._rows(rec, self._next_id(), log_row)
        except Exception as e:  # a record that cannot even be turned into a row
            self._set_aside(rec, None, [], e)
            return None

    def _rows(self, r: RequestRecord, row_id: str, log_row: bool = True) -> _Pending:
        # A client's own text (the model it asked for, its `user`) may hold a NUL, which
        # PostgreSQL refuses in text: the whole batch would be refused and written again row by
        # row, and the request set aside, out of the request log.
        r.model = _no_nul(r.model)
        r.user = _no_nul(r.user) if r.user is not None else None
        p, c, cached, est = _tokens(r.usage)
        base = self.baseline.get(r.route)
        baseline = cost_of(base, r.usage, r.started) if base is not None and r.usage is not None else r.cost_usd
        # A cached answer's baseline is at least what it would have cost without the cache, so
        # its saving shows in the spend report (`--by outcome`: the cache_hit rows) and the stats.
        # max(baseline, r.cost_usd, r.saved_usd), as builtin max compares, without its ~4,000 instructions
        if r.cost_usd > baseline:
            baseline = r.cost_usd
        if r.saved_usd > baseline:
            baseline = r.saved_usd
        row = (
            r.request_id, r.started, _day(int(r.started // 86400)), r.key, r.team,
            r.user, r.model, r.route, r.rule, r.deployment, int(r.stream), r.status, r.outcome,
            r.admission, p, c, cached, est, r.cost_usd, baseline, r.latency_ms,
            len(r.attempts), row_id,
        )  # fmt: skip
        attempts: list[Row] = []
        if self.record_attempts:
            for n, a in enumerate(r.attempts):
                ap, ac, _, _ = _tokens(a.usage)
                attempts.append(
                    (
                        r.request_id, n, a.deployment, a.provider, a.outcome, a.status, a.latency_ms,
                        int(a.hedge), ap, ac, a.cost_usd, row_id,
                    )
                )  # fmt: skip
        request = None
        if self.request_log is not None and log_row:
            request = requestlog_rows.row(r, baseline, self.request_log.max_content_bytes)
        # The bytes were only needed for the row: do not keep a prompt alive any longer.
        r.content_request = r.content_response = None
        return _Pending(r, row, attempts, request, baseline)

    def close(self) -> None:
        """Stops the writer and writes whatever is left (graceful shutdown loses nothing the
        store will take): retries for up to `close_timeout` seconds while it is unavailable;
        then logs each record it could not write and counts it in `lost_at_close`."""
        self._stop = True
        self._halt.set()
        self._wake.set()
        self._thread.join(timeout=30)
        deadline = time.monotonic() + self.close_timeout
        pause = 0.05
        self.flush()
        while (self._queue or self._retry) and time.monotonic() < deadline:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)
            self.flush()
        with self._lock:
            # Nothing left pending by a graceful stop: an older release, which reads the
            # levels alone, finds every request there.
            while not self._spread_pending(_ALL_MINUTES) and time.monotonic() < deadline + 10:
                pass
            lost = [p.rec for h in self._retry for p in h.pending] + list(self._queue)
            self._retry.clear()
            self._queue.clear()
            for rec in lost:
                self.lost_at_close += 1
                log.error("ledger: not written at shutdown, the store is unavailable: %s", _describe(rec, None, []))
        self.backend.close()


def _take_all(queue: collections.deque[T], most: int | None = None) -> list[T]:
    """The oldest `most` (all) items of a queue another thread also takes from."""
    taken: list[T] = []
    while queue and (most is None or len(taken) < most):
        try:
            taken.append(queue.popleft())
        except IndexError:  # the other thread took the last one
            break
    return taken


def _describe(rec: RequestRecord, row: Row | None, attempts: list[Row]) -> dict[str, Any]:
    """A record for the log: its rows by column name when they were built, else its fields
    (without attempt error texts, which may quote an upstream's answer)."""
    if row is not None:
        return {
            **dict(zip(COLUMNS, row, strict=True)),
            "attempt_rows": [dict(zip(ATTEMPT_COLUMNS, a, strict=True)) for a in attempts],
        }
    fields = dataclasses.asdict(rec)
    for k in ("content_request", "content_response"):  # a prompt or an answer never goes to the log
        fields.pop(k, None)
    for a in fields["attempts"]:
        a.pop("error", None)
    return fields


def ledger_from_config(cfg: Config, base_dir: Path | None = None) -> Ledger | None:
    """The configured ledger; without a `ledger:` section, the embedded default (SQLite
    beside the config file) when serving from a file; None for `backend: memory`."""
    lc = cfg.ledger
    if lc is None:
        if base_dir is None:  # an in-process config (tests, embedding): nowhere obvious to write
            return None
        lc = LedgerConfig()
    if lc.backend == "memory":
        return None
    return Ledger(
        backend_for(lc, base_dir),
        lc.flush_interval,
        lc.record_attempts,
        most_expensive(cfg),
        request_log=cfg.request_log,
        low_priority=lc.writer_priority == "low",
        on_unavailable=lc.on_unavailable,
    )
