"""Request log figures: writes at a fixed rate (does the writer keep up, or does its queue
grow?) and `GET /admin/stats` over a million stored requests.

    python -m edgeroute.bench.requestlog writes --rate 5000 --seconds 10
    python -m edgeroute.bench.requestlog crash --rate 5000 --runs 3
    python -m edgeroute.bench.requestlog stall --rate 1000 --seconds 10
    python -m edgeroute.bench.requestlog stats --rows 1000000
    python -m edgeroute.bench.requestlog cpu --records 20000 --batch 500 --rate 1000 [--mix single]
    python -m edgeroute.bench.requestlog instructions [--batch 500] [--mix single] [--tree OTHER]

`writes` reports the most records ever not yet in the store (queued or in the batch being
written: what a `kill -9` at that moment would lose) in flush intervals' worth of records;
`crash` feeds a writer process at the rate, kills it with SIGKILL mid-load and counts the
records it lost, checking that every record older than one interval is stored.

`stall` is what the writer thread costs the event loop: an asyncio loop records at the
given rate and wakes every millisecond; how late it wakes, with the writer (ledger and
request log), with the ledger alone and with no writer, is the time it waited for the GIL
(and the CPU), the share of the request log in the proxy's tail latency.

`cpu` is the writer's CPU per record (`Ledger.writer_cpu_s`: the thread's time, which is
mostly time it holds the GIL) for records arriving at `rate` and written `batch` at a time,
with its split: building the rows, adding up the rollups, each statement, the commit.

`instructions` is the writer's work a record in instructions (callgrind; needs valgrind), which
a busy host does not move: `--batches` batches written after four that warm the statements, the
count on only while they are (`--tree`: the writer of another checkout, for before and after;
its records start at one minute's beginning, so that no minute's spread falls among them).

Records are realistic in shape (five models, eight deployments over four providers, twenty
teams, two hundred keys, one request in ten failing over to a second attempt) and written
through the real ledger writer into SQLite in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import mmap
import os
import random
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeroute import looplag
from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.cost.ledger import Ledger, _Held
from edgeroute.cost.ledger_store import Backend, PostgresBackend, SqliteBackend
from edgeroute.cost.writer_breath import never
from edgeroute.requestlog import query, rollup
from edgeroute.requestlog.settings import RequestLog

MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "claude-haiku", "gemini-flash")


def record(i: int, started: float, rng: random.Random) -> RequestRecord:
    model = MODELS[i % len(MODELS)]
    dep = f"dep-{i % 8}"
    usage = Usage(rng.randint(20, 2000), rng.randint(5, 800))
    latency = rng.lognormvariate(6, 0.8)
    attempts = [
        AttemptRecord(
            dep, f"prov-{i % 4}", "success", 200, latency, usage=usage, cost_usd=usage.completion_tokens * 2e-6
        )
    ]
    if i % 10 == 0:
        attempts.insert(
            0, AttemptRecord(f"dep-{(i + 1) % 8}", f"prov-{(i + 1) % 4}", "server_error", 503, 40.0, kind="first")
        )
        attempts[1].kind = "retry"
    rec = RequestRecord(
        request_id=f"req_{i:010x}", started=started, model=model, route=model, rule=f"rule-{i % 10}",
        team=f"team-{i % 20}", key=f"key-{i % 200}", user=f"user-{i % 1000}", status=200, outcome="ok",
        latency_ms=latency + 0.3, deployment=dep, usage=usage, cost_usd=attempts[-1].cost_usd, attempts=attempts,
        stream=i % 3 == 0, ttft_ms=latency / 4 if i % 3 == 0 else None, tags=["bench"], reasons=["default route"],
    )  # fmt: skip
    return rec


def writes(rate: int, seconds: float, flush: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(SqliteBackend(Path(tmp) / "log.db"), flush_interval=flush, request_log=RequestLog())
        rng = random.Random(1)
        n = int(rate * seconds)
        now = time.time()
        recs = [record(i, now + i / rate, rng) for i in range(n)]
        depths: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                depths.append(ledger.queue_depth())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        for i, r in enumerate(recs):  # paced: record i goes in at t0 + i / rate
            ahead = t0 + i / rate - time.perf_counter()
            if ahead > 0.001:
                time.sleep(ahead)
            ledger.record(r)
        fed = time.perf_counter() - t0
        drained_at = time.perf_counter()
        while ledger.queue_depth() and time.perf_counter() - drained_at < 30:
            time.sleep(0.01)
        drain = time.perf_counter() - drained_at
        stop.set()
        sampler.join()
        ledger.close()
        interval = rate * flush
        half = depths[len(depths) // 2 :]
        print(f"fed {n} records at {n / fed:,.0f}/s for {fed:.1f}s (flush interval {flush}s = {interval:.0f} records)")
        print(f"not yet stored (queued or being written), sampled every 5 ms: peak {max(depths)} = "
              f"{max(depths) / interval:.2f} intervals, median {statistics.median(depths):.0f}, "
              f"second half peak {max(half) / interval:.2f} intervals")  # fmt: skip
        print(f"all stored {drain:.2f}s after the last record; written {ledger.written}; "
              f"writer CPU {ledger.writer_cpu_s / max(1, ledger.written) * 1e6:.0f} us/record")  # fmt: skip


# -- crash: SIGKILL a writer process mid-load ---------------------------------------------------


def feed(db: Path, rate: int, seconds: float, flush: float, progress: Path, low_priority: bool = False) -> None:
    """Records `rate` a second through a ledger writing `db`, counting what was recorded in
    `progress` (8 bytes, shared memory): what the process killed mid-load had recorded."""
    ledger = Ledger(SqliteBackend(db), flush_interval=flush, request_log=RequestLog(), low_priority=low_priority)
    with progress.open("r+b") as f:
        fed = mmap.mmap(f.fileno(), 8)
    rng = random.Random(3)
    now = time.time()
    print("feeding", flush=True)
    t0 = time.perf_counter()
    for i in range(int(rate * seconds)):
        ahead = t0 + i / rate - time.perf_counter()
        if ahead > 0.001:
            time.sleep(ahead)
        ledger.record(record(i, now + i / rate, rng))
        struct.pack_into("<q", fed, 0, i + 1)
    ledger.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Crash:
    rate: int
    flush: float
    fed: int  # records the killed process had recorded
    stored: int  # of them, in the database after the kill (spend and request log alike)
    old: int  # of them, recorded more than one interval (plus `slack`) before the kill
    old_missing: int  # ... and not stored: must be 0
    not_a_prefix: int  # stored records with an unstored one before them: must be 0
    log_rows: int  # request-log rows stored: must equal `stored`

    @property
    def lost(self) -> int:
        return self.fed - self.stored

    @property
    def lost_intervals(self) -> float:
        return self.lost / (self.rate * self.flush)


def _stored(db: Path, table: str, column: str) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        return {int(r[0][4:], 16) for r in conn.execute(f"SELECT {column} FROM {table}")}
    finally:
        conn.close()


def crash(rate: int, flush: float, kill_after: float, slack: float = 0.05, low_priority: bool = False) -> Crash:
    """Starts a `feed` process, kills it with SIGKILL `kill_after` seconds into the load and
    compares what it had recorded with what the database holds (`low_priority`: the writer
    thread's, as `ledger.writer_priority: low`)."""
    with tempfile.TemporaryDirectory() as tmp:
        db, progress = Path(tmp) / "log.db", Path(tmp) / "fed"
        progress.write_bytes(bytes(8))
        args = ["feed", "--db", str(db), "--rate", str(rate), "--flush", str(flush), "--progress", str(progress)]
        args += ["--writer-priority", "low" if low_priority else "normal"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeroute.bench.requestlog", *args, "--seconds", str(kill_after + 30)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "feeding"
            with progress.open("r+b") as f:
                fed = mmap.mmap(f.fileno(), 8)
            samples: list[tuple[float, int]] = []  # (when, records recorded by then)
            end = time.monotonic() + kill_after
            while (now := time.monotonic()) < end:
                samples.append((now, struct.unpack_from("<q", fed, 0)[0]))
                time.sleep(0.002)
            killed_at = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)  # the process started above
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        total = struct.unpack_from("<q", fed, 0)[0]
        # Recorded before this sample: more than one interval (and the sampling slack) ago.
        old = max((n for t, n in samples if t <= killed_at - flush - slack), default=0)
        stored = _stored(db, "spend", "request_id")
        logged = _stored(db, "requests", "id")
        first_gap = min(set(range(total)) - stored, default=total)
        return Crash(
            rate, flush, total, len(stored), old, sum(1 for i in range(old) if i not in stored),
            sum(1 for i in stored if i > first_gap), len(logged),
        )  # fmt: skip


async def _paced(ledger: Ledger | None, recs: list[RequestRecord], rate: int) -> list[float]:
    """Records `recs` at `rate` from the loop, waking every millisecond; each wake's lateness (ms)."""
    loop = asyncio.get_running_loop()
    late: list[float] = []
    t0 = loop.time()
    i = 0
    tick = 0.001
    while i < len(recs):
        due = t0 + len(late) * tick + tick
        await asyncio.sleep(max(0.0, due - loop.time()))
        late.append(max(0.0, loop.time() - due) * 1000)
        while i < len(recs) and i <= (loop.time() - t0) * rate:
            if ledger is not None:
                ledger.record(recs[i])
            i += 1
    return late


def stall(rate: int, seconds: float, flush: float, switch_s: float) -> None:
    sys.setswitchinterval(switch_s)  # as the server sets it (looplag), unless told otherwise
    rng = random.Random(1)
    n = int(rate * seconds)
    print(
        f"loop wake-up lateness (ms) while recording {rate}/s for {seconds:.0f}s (flush interval {flush}s, "
        f"GIL switch interval {switch_s * 1000:g} ms)"
    )
    print(f"  {'writer':<26} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}  writer CPU/record")
    for label, log_on in (("ledger + request log", True), ("ledger only", False), ("none", None)):
        with tempfile.TemporaryDirectory() as tmp:
            now = time.time()
            recs = [record(i, now + i / rate, rng) for i in range(n)]
            ledger = None
            if log_on is not None:
                rl = RequestLog(enabled=log_on)
                ledger = Ledger(SqliteBackend(Path(tmp) / "log.db"), flush_interval=flush, request_log=rl)
            late = sorted(asyncio.run(_paced(ledger, recs, rate)))
            cpu = ""
            if ledger is not None:
                ledger.close()
                cpu = f"{ledger.writer_cpu_s / max(1, ledger.written) * 1e6:.0f} us"
        q = [late[min(len(late) - 1, int(p * len(late)))] for p in (0.5, 0.99, 0.999)]
        print(f"  {label:<26} {q[0]:7.3f} {q[1]:7.3f} {q[2]:7.3f} {late[-1]:7.3f}  {cpu}")


# -- cpu: the writer's CPU per record, and where it goes --------------------------------------


def _mixed(i: int, started: float, rng: random.Random, random_ids: bool = False, single: bool = False) -> RequestRecord:
    """A `record` with the statuses of real traffic: one in 25 fails (a 503 or a 429 after
    its attempts, no usage), one in 50 is a cache hit, and a few carry a task and a variant.
    Its id is shaped as the proxy's are (`openai_api._RequestIds`): the time in milliseconds,
    then random bits (`random_ids`: random throughout, as before 2026-12-04). `single`: one
    tenant's traffic (one model, no key, no team)."""
    rec = record(i, started, rng)
    if single:
        rec.model = rec.route = MODELS[0]
        rec.key = rec.team = None
    head = rng.getrandbits(40) if random_ids else int(rec.started * 1000) & 0xFF_FFFF_FFFF
    rec.request_id = f"req_{head:010x}{rng.getrandbits(56):014x}"
    if i % 25 == 7:
        rec.status, rec.outcome, rec.usage, rec.cost_usd = (
            (503, "error", None, 0.0) if i % 2 else (429, "rate_limited", None, 0.0)
        )
        for a in rec.attempts:
            a.outcome, a.status, a.usage, a.cost_usd = "server_error", rec.status, None, 0.0
        rec.deployment = None
    elif i % 50 == 11:
        rec.cache, rec.saved_usd, rec.attempts, rec.cost_usd = "hit", rec.cost_usd, [], 0.0
    if i % 4 == 0:
        rec.task, rec.variant, rec.policy = ("code", "chat", "qa")[i % 3], f"v{i % 2}", "cost"
    return rec


class _TimedCursor:
    """A cursor that adds each statement's CPU time to `split` under the table it writes."""

    def __init__(self, cur: Any, split: dict[str, float]) -> None:
        self._cur, self._split = cur, split

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def _add(self, sql: str, t: float) -> None:
        words = sql.split()
        what = words[2] if words[0] == "INSERT" else words[0].lower()
        if what == "request_rollups":
            what = "rollups (SQL)"
        self._split[what] = self._split.get(what, 0.0) + time.thread_time() - t

    def execute(self, sql: str, params: Any = ()) -> Any:
        t = time.thread_time()
        self._cur.execute(sql, params)
        self._add(sql, t)
        return self

    def executemany(self, sql: str, rows: Any) -> Any:
        t = time.thread_time()
        self._cur.executemany(sql, rows)
        self._add(sql, t)
        return self


class _TimedSqlite(SqliteBackend):
    def __init__(self, path: Path, split: dict[str, float]) -> None:
        super().__init__(path)
        self.split = split

    def write(self, batch: Any, rest: Callable[[], None] = never) -> None:
        with self._conn:
            self._sql.run(_TimedCursor(self._conn.cursor(), self.split), batch, rest=rest)
            t = time.thread_time()
        self.split["commit"] = self.split.get("commit", 0.0) + time.thread_time() - t

    def spread(self, before: int, limit: int) -> int:
        t = time.thread_time()
        moved = super().spread(before, limit)
        self.split["rollup spread (SQL)"] = self.split.get("rollup spread (SQL)", 0.0) + time.thread_time() - t
        return moved


def _cpu_run(recs: list[RequestRecord], batch: int, warm: int, path: Path, split: dict[str, float] | None) -> float:
    """Writer CPU µs per record after the first `warm` records (written, not counted)."""
    backend: Backend = SqliteBackend(path) if split is None else _TimedSqlite(path, split)
    ledger = Ledger(backend, flush_interval=3600, request_log=RequestLog())
    for r in recs[:warm]:
        ledger.record(r)
    ledger.flush()
    ledger.writer_cpu_s, ledger.written = 0.0, 0
    if split is not None:
        split.clear()
        pending, held_batch = ledger._pending, _Held.batch

        def timed_pending(rec: RequestRecord, log_row: bool = True) -> Any:
            t = time.thread_time()
            try:
                return pending(rec, log_row)
            finally:
                split["rows (Python)"] = split.get("rows (Python)", 0.0) + time.thread_time() - t

        def timed_batch(held: _Held, log_on: bool, levels: Any = rollup.LEVELS, rest: Any = never) -> Any:
            t = time.thread_time()
            try:
                return held_batch(held, log_on, levels, rest)
            finally:
                split["rollups (Python)"] = split.get("rollups (Python)", 0.0) + time.thread_time() - t

        ledger._pending = timed_pending  # type: ignore[method-assign]
        _Held.batch = timed_batch  # type: ignore[method-assign,assignment]
    try:
        for i in range(warm, len(recs), batch):
            for r in recs[i : i + batch]:
                ledger.record(r)
            ledger.flush()
    finally:
        if split is not None:
            _Held.batch = held_batch  # type: ignore[method-assign]
    per = ledger.writer_cpu_s / max(1, ledger.written) * 1e6
    if ledger.written != len(recs) - warm:
        raise SystemExit(f"written {ledger.written} of {len(recs) - warm}: the bench lost records")
    ledger.close()
    return per


def cpu(records: int, batch: int, rate: int, runs: int, random_ids: bool = False, mix: str = "tenants") -> None:
    rng = random.Random(4)
    now = time.time()
    recs = [_mixed(i, now + i / rate, rng, random_ids, mix == "single") for i in range(records + batch * 4)]
    warm = batch * 4
    what = "one model, no key or team" if mix == "single" else "200 keys in 20 teams"
    print(f"writer CPU per record: {records} records ({what}) arriving at {rate}/s, {batch} a batch, SQLite, "
          "request log on")  # fmt: skip
    per: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            fresh = [dataclasses.replace(r, attempts=[dataclasses.replace(a) for a in r.attempts]) for r in recs]
            per.append(_cpu_run(fresh, batch, warm, Path(tmp) / "log.db", None))
    print(f"  total: median {statistics.median(per):.1f} us/record over {runs} runs "
          f"({', '.join(f'{p:.1f}' for p in per)})")  # fmt: skip
    split: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        total = _cpu_run(recs, batch, warm, Path(tmp) / "log.db", split)
    print(f"  split (one more run with timers, {total:.1f} us/record in all):")
    for what, s in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"    {what:<24} {s / records * 1e6:6.1f} us")
    rest = total - sum(split.values()) / records * 1e6
    print(f"    {'other':<24} {rest:6.1f} us")


# Run under callgrind, counting off (`--instr-atstart=no`): writes argv[3] batches of argv[2]
# records (argv[4]: the mix) after four that prepare the statements, counting on only meanwhile.
# Code that the writers of earlier checkouts run too (`--tree`).
_COUNTED = """
import os, random, subprocess, sys, tempfile, time
from pathlib import Path
from edgeroute.bench.requestlog import _mixed
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend
from edgeroute.requestlog.settings import RequestLog
batch, batches, single = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "single"
# All in one minute (a batch past a minute's end spreads the one before: counted or not, by chance)
rng, now = random.Random(4), time.time() // 60 * 60 - 59
recs = [_mixed(i, now + i / 1000, rng, False, single) for i in range(batch * (batches + 4))]
def counting(on):
    switch = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(switch, check=True, capture_output=True)
with tempfile.TemporaryDirectory() as tmp:
    ledger = Ledger(SqliteBackend(Path(tmp) / "l.db"), flush_interval=3600, request_log=RequestLog())
    for i in range(0, len(recs), batch):
        if i == batch * 4:
            counting(True)
        for r in recs[i : i + batch]:
            ledger.record(r)
        ledger.flush()
    counting(False)
    ledger.close()
"""


def instructions(batch: int, batches: int, mix: str, tree: str | None) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    root = tree or str(Path(__file__).resolve().parents[2])
    with tempfile.TemporaryDirectory() as out:
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.out",
                sys.executable, "-c", _COUNTED, str(batch), str(batches), mix]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": root}
        subprocess.run(argv, check=True, capture_output=True, env=env, cwd=root)
        total = next(int(line.split()[1]) for line in Path(out, "cg.out").read_text().splitlines()
                     if line.startswith("totals:"))  # fmt: skip
    what = "one model, no key or team" if mix == "single" else "200 keys in 20 teams"
    print(f"writer instructions a record ({root}; {batches} batches of {batch}, {what}, SQLite, request log on): "
          f"{total / (batch * batches) / 1000:.1f}k")  # fmt: skip


def _fill(backend: Backend, rows: int, hours: float) -> float:
    ledger = Ledger(backend, flush_interval=3600, request_log=RequestLog())
    rng = random.Random(2)
    start = time.time() - hours * 3600
    t0 = time.perf_counter()
    for i in range(rows):
        ledger.record(record(i, start + i * hours * 3600 / rows, rng))
        if i % 20_000 == 19_999:
            ledger.flush()
    ledger.close()
    return time.perf_counter() - t0


def _timed(db: Backend, q: dict[str, str], runs: int) -> tuple[float, float, int]:
    times = []
    n = 0
    for _ in range(runs):
        t = time.perf_counter()
        out = query.stats(db, q)
        times.append((time.perf_counter() - t) * 1000)
        n = out["totals"]["requests"]
    return statistics.median(times), max(times), n


def stats(rows: int, runs: int, keep: str | None, pg: str | None) -> None:
    """Fills a database with `rows` requests over 24 hours through the real writer (SQLite in
    a temporary directory or at `keep`, reused when it exists; or the PostgreSQL at `pg`,
    reused when `keep` is given), then times `/admin/stats` queries over the day."""
    tmp = tempfile.TemporaryDirectory()
    path = Path(keep) if keep else Path(tmp.name) / "log.db"
    fresh = not path.exists() if pg is None else not keep
    if fresh and pg is not None and PostgresBackend(pg).scalar("SELECT COUNT(*) FROM requests"):
        raise SystemExit("the PostgreSQL database holds requests already: --keep to query them, or an empty one")
    if fresh:
        secs = _fill(SqliteBackend(path) if pg is None else PostgresBackend(pg), rows, 24)
        size = f"; {path.stat().st_size / 1e6:.0f} MB" if pg is None else ""
        print(f"stored {rows:,} requests over 24 h in {secs:.0f}s ({rows / secs:,.0f}/s){size}")
    db: Backend = SqliteBackend(path) if pg is None else PostgresBackend(pg)
    cases = [
        {"since": "24h"},
        {"since": "24h", "bucket": "300"},
        {"since": "24h", "group_by": "model"},
        {"since": "24h", "group_by": "deployment", "bucket": "3600"},
        {"since": "24h", "group_by": "team"},
        {"since": "24h", "group_by": "key"},
        # One team's (a team key's view, or team= for a key bound to none): its own rows alone.
        {"since": "24h", "group_by": "model", "team": "team-3"},
        {"since": "24h", "group_by": "deployment", "bucket": "3600", "team": "team-3"},
    ]
    print(f"GET /admin/stats over a 24-hour window, {db.dialect} ({runs} runs each): median / max ms")
    for q in cases:
        med, worst, n = _timed(db, q, runs)
        label = "&".join(f"{k}={v}" for k, v in q.items())
        print(f"  {label:<45} {med:7.1f} / {worst:7.1f}   ({n:,} requests)")
    t = time.perf_counter()
    page = query.list_requests(db, {"since": "24h", "model": "gpt-4o", "limit": "100"})
    ms = (time.perf_counter() - t) * 1000
    print(f"GET /admin/requests?model=gpt-4o&limit=100: {ms:.1f} ms ({len(page['data'])} rows)")
    db.close()
    tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.requestlog", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("writes", help="records at a fixed rate through the ledger writer; queue depth over time")
    w.add_argument("--rate", type=int, default=5000)
    w.add_argument("--seconds", type=float, default=10.0)
    w.add_argument("--flush", type=float, default=0.5)
    g = sub.add_parser("stall", help="how late an event loop wakes while the writer runs (its GIL share)")
    g.add_argument("--rate", type=int, default=1000)
    g.add_argument("--seconds", type=float, default=10.0)
    g.add_argument("--flush", type=float, default=0.5)
    g.add_argument("--switch-interval", type=float, default=looplag.SWITCH_INTERVAL_S, help="seconds (Python's: 0.005)")
    c = sub.add_parser("crash", help="SIGKILL a writer process mid-load; what it lost, in flush intervals")
    c.add_argument("--rate", type=int, default=5000)
    c.add_argument("--flush", type=float, default=0.5)
    c.add_argument("--runs", type=int, default=3)
    c.add_argument("--writer-priority", choices=("low", "normal"), default="normal", help="as ledger.writer_priority")
    f = sub.add_parser("feed", help="(for crash) record at a rate into --db until killed")
    f.add_argument("--db", type=Path, required=True)
    f.add_argument("--progress", type=Path, required=True)
    f.add_argument("--rate", type=int, default=5000)
    f.add_argument("--seconds", type=float, default=30.0)
    f.add_argument("--flush", type=float, default=0.5)
    f.add_argument("--writer-priority", choices=("low", "normal"), default="normal")
    s = sub.add_parser("stats", help="stats query times over N stored requests in 24 h")
    s.add_argument("--rows", type=int, default=1_000_000)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--keep", help="a database path to fill once and reuse (with --pg: reuse what is there)")
    s.add_argument("--pg", help="a PostgreSQL DSN (an empty database) to fill and query instead of SQLite")
    u = sub.add_parser("cpu", help="the writer's CPU per record and its split")
    u.add_argument("--records", type=int, default=20_000)
    u.add_argument("--batch", type=int, default=500)
    u.add_argument("--rate", type=int, default=1000, help="records a second, for their timestamps")
    u.add_argument("--runs", type=int, default=3)
    u.add_argument("--random-ids", action="store_true", help="request ids random throughout (before 2026-12-04)")
    u.add_argument("--mix", choices=("tenants", "single"), default="tenants",
                   help="tenants: 200 keys in 20 teams, five models; single: one model, no key or team")  # fmt: skip
    n = sub.add_parser("instructions", help="the writer's instructions a record (callgrind)")
    n.add_argument("--batch", type=int, default=500)
    n.add_argument("--batches", type=int, default=8)
    n.add_argument("--mix", choices=("tenants", "single"), default="single")
    n.add_argument("--tree", help="the writer of this checkout (its extension built), for before and after")
    a = p.parse_args(argv)
    if a.what == "instructions":
        instructions(a.batch, a.batches, a.mix, a.tree)
    elif a.what == "cpu":
        cpu(a.records, a.batch, a.rate, a.runs, a.random_ids, a.mix)
    elif a.what == "writes":
        writes(a.rate, a.seconds, a.flush)
    elif a.what == "crash":
        rng = random.Random()
        print(f"SIGKILL of a process recording {a.rate}/s (flush interval {a.flush}s = {a.rate * a.flush:.0f} records)")
        for _ in range(a.runs):
            r = crash(a.rate, a.flush, rng.uniform(2.0, 4.0), low_priority=a.writer_priority == "low")
            verdict = "ok" if r.old_missing == r.not_a_prefix == 0 and r.log_rows == r.stored else "FAILED"
            print(f"  recorded {r.fed}, stored {r.stored}: lost {r.lost} = {r.lost_intervals:.2f} intervals; "
                  f"older than one interval and missing: {r.old_missing} ({verdict})")  # fmt: skip
    elif a.what == "feed":
        feed(a.db, a.rate, a.seconds, a.flush, a.progress, a.writer_priority == "low")
    elif a.what == "stall":
        stall(a.rate, a.seconds, a.flush, a.switch_interval)
    else:
        stats(a.rows, a.runs, a.keep, a.pg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
