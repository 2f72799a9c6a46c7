"""Where the operator's queries run: the request log's pages and stats, and the spend reports.

They run on a small pool of their own (QUERY_THREADS), never on the default executor that the
request path (large bodies' scans, token counts) and the key store share: a viewer's slow
queries, however many, wait here, not in front of a revocation or a long prompt. Each key has at
most `request_log.max_queries_per_key` of them in flight and a team's keys together twice that
(a few more wait briefly for a slot, then 429 `too_many_queries`). The tenants are the teams and
the keys of no team below `operator` (a dashboard's viewer key: each its own tenant); the
operator's callers are the rest (keys of no team with role `operator` or `admin`, keyless and
shared-key clients). The pool is shared out, not first come first served: a tenant runs at most
TEAM_THREADS at a time and all tenants at most TEAMS_THREADS, so that one tenant's slow queries
leave a thread to the others and one is always the operator's; a free thread goes to the tenant
served least recently. Past MAX_WAITING in flight, a tenant that holds its fair share of them
(MAX_WAITING over the tenants in flight, at least one) is refused (503 `queries_busy`), so that a
few tenants' floods cannot shut the others out; the operator's callers have MAX_WAITING apart.
Each query is answered within `request_log.query_timeout_s` of its arrival, its wait included
(503 `query_timeout`, saying how to narrow it): SQLite stops it from a progress handler,
PostgreSQL by the transaction's `statement_timeout`, and one still waiting for a thread at its
deadline leaves the line. The limits are each process's (`serve --workers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from aiohttp import web

from edgeroute import roles, sqlite_wal
from edgeroute.cost.keys import IDENTITY
from edgeroute.cost.ledger_store import Backend, PostgresBackend, SqliteBackend
from edgeroute.errors import ProxyError
from edgeroute.state import STATE

_T = TypeVar("_T")

QUERY_THREADS = 3
# One tenant's queries leave a thread to the other tenants, and all tenants' one to the operator's.
TEAM_THREADS = QUERY_THREADS - 2
TEAMS_THREADS = QUERY_THREADS - 1
MAX_WAITING = 16  # running and queued: the operator's; the tenants' past it only to their fair share
OPERATOR = "operator"  # the class of the operator's callers (the tenants' is TENANTS)
TENANTS = "tenants"
# A tenant's counter: a team's, or a key's of no team below `operator` (its own tenant).
_TENANT_PREFIXES = ("team:", "solo:")
# A query past its key's or team's limit waits for a slot (half its deadline, at most this
# long; at most LINE_PER_KEY of a key's) before its 429: a console page's panels come at once.
MAX_LINE_WAIT_S = 5.0
LINE_PER_KEY = 16
_LINE_POLL_S = 0.05


class QueryTimeout(TimeoutError):
    """A query ran past its deadline and was stopped."""


class Bounded:
    """A backend's reads (`dialect`, `query`) under one deadline for all of a call's statements."""

    def __init__(self, backend: Backend, timeout_s: float, end: float | None = None) -> None:
        self.dialect = backend.dialect
        self._backend = backend
        self.end = time.monotonic() + timeout_s if end is None else end

    def _left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise QueryTimeout
        return left

    def query(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        left = self._left()
        if isinstance(self._backend, SqliteBackend):
            return self._sqlite(self._backend.path, sql, params)
        if isinstance(self._backend, PostgresBackend):
            return _postgres(self._backend, sql, params, left)
        return self._backend.query(sql, params)

    def _sqlite(self, path: str, sql: str, params: Any) -> list[tuple[Any, ...]]:
        try:
            return sqlite_wal.read_until(path, sql, params, self.end)
        except TimeoutError:
            raise QueryTimeout from None


def _postgres(backend: PostgresBackend, sql: str, params: Any, left: float) -> list[tuple[Any, ...]]:
    canceled = backend._psycopg.errors.QueryCanceled
    with backend._reader() as conn:  # the backend's kept read connections
        try:
            with conn.transaction():  # SET LOCAL: the timeout ends with it, the kept connection has none
                conn.execute(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
                return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]
        except canceled:
            raise QueryTimeout from None


Holder = tuple[str, int, str]  # (counter, its limit, who it is in a refusal)


@dataclass(eq=False)
class _Job:
    """A query admitted, waiting in its tenant's line for a thread, then running."""

    who: list[Holder]
    tenant: str  # "team:<name>", "solo:<key id>", else the operator's caller's ("key:<id>", "peer:<address>")
    call: Callable[[], Any]
    done: asyncio.Future[Any]
    expiry: asyncio.TimerHandle | None = None

    @property
    def capped(self) -> bool:
        return _capped(self.tenant)


class Gate:
    """The queries in flight (waiting for a thread or running) and which thread each gets; kept
    on the event loop: a query's end comes back to it from its thread."""

    def __init__(self, threads: int = QUERY_THREADS) -> None:
        self.held: dict[str, int] = {}  # "key:<id>", "solo:<id>", "peer:<address>", "team:<name>"
        self.waiting: dict[str, int] = {}  # a key's queries waiting for a slot (before admission)
        self.in_flight: dict[str, int] = {}  # by class: TENANTS, OPERATOR
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgeroute-query")
        self._lines: dict[str, deque[_Job]] = {}  # by tenant, each first come first served
        self._running: dict[str, int] = {}  # by tenant
        self._served: dict[str, int] = {}  # by tenant: when it last got a thread (a count of starts)
        self._starts = 0
        self._busy = 0
        self._tenants_busy = 0
        self._closed = False

    def admit(self, who: list[Holder]) -> None:
        """Counts a query against its key, its team and its class, or refuses it."""
        for name, limit, label in who:
            if self.held.get(name, 0) >= limit:
                raise ProxyError(
                    429,
                    f"{label} already has {limit} operator queries (request log, spend, audit) in flight;"
                    " wait for them to finish before sending more.",
                    code="too_many_queries",
                    headers={"Retry-After": "1"},
                )
        if self._busy_for(who):
            raise ProxyError(
                503,
                "Too many operator queries (request log, spend, audit) are waiting; try again shortly.",
                code="queries_busy",
                headers={"Retry-After": "1"},
            )
        for name, _, _ in who:
            self.held[name] = self.held.get(name, 0) + 1
        _add(self.in_flight, _class(who), 1)

    def _busy_for(self, who: list[Holder]) -> bool:
        """Whether the query's class is full: the operator's at MAX_WAITING; the tenants' past it
        only for a tenant that holds its fair share already: each other tenant still gets its
        own (one each past MAX_WAITING tenants), so a few tenants' floods cannot shut the others
        out, and the places grow only with the tenants in flight, keys an admin made."""
        cls = _class(who)
        if self.in_flight.get(cls, 0) < MAX_WAITING:
            return False
        if cls == OPERATOR:
            return True
        tenant = _tenant(who)
        holds = self.held.get(tenant, 0)
        active = sum(1 for name in self.held if _capped(name)) + (holds == 0)
        return holds >= max(1, MAX_WAITING // active)

    def release(self, who: list[Holder]) -> None:
        _add(self.in_flight, _class(who), -1)
        for name, _, _ in who:
            _add(self.held, name, -1)

    def submit(self, who: list[Holder], call: Callable[[], _T], end: float) -> _Job:
        """Puts an admitted query in its tenant's line; at `end` (monotonic), if it is still
        there, it leaves it with `QueryTimeout`."""
        loop = asyncio.get_running_loop()
        job = _Job(who, _tenant(who), call, loop.create_future())
        self._lines.setdefault(job.tenant, deque()).append(job)
        job.expiry = loop.call_later(max(0.0, end - time.monotonic()), self._expire, job)
        self._dispatch()
        return job

    def withdraw(self, job: _Job) -> None:
        """Its client is gone: a query still in line leaves it (a running one ends at its deadline,
        and frees its slots then, so that hanging up and asking again cannot pass the limits)."""
        if self._leave_line(job):
            self.release(job.who)

    def close(self) -> None:
        """The app's end: no query starts any more, those in line are cancelled."""
        self._closed = True
        for line in self._lines.values():
            for job in line:
                if job.expiry is not None:
                    job.expiry.cancel()
                job.done.cancel()
        self._lines.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _expire(self, job: _Job) -> None:
        if self._leave_line(job):
            self.release(job.who)
            if not job.done.done():
                job.done.set_exception(QueryTimeout())

    def _leave_line(self, job: _Job) -> bool:
        line = self._lines.get(job.tenant)
        if line is None or job not in line:
            return False
        line.remove(job)
        if not line:
            del self._lines[job.tenant]
        if job.expiry is not None:
            job.expiry.cancel()
        return True

    def _dispatch(self) -> None:
        """Starts queries while threads are free: of the tenants that may start one, the one
        served least recently (a tenant never served yet first)."""
        while self._busy < self._threads and not self._closed:
            ready = [t for t in self._lines if self._may_start(t)]
            if not ready:
                return
            tenant = min(ready, key=lambda t: self._served.get(t, -1))
            line = self._lines[tenant]
            job = line.popleft()
            if not line:
                del self._lines[tenant]
            self._start(job)

    def _may_start(self, tenant: str) -> bool:
        if not _capped(tenant):
            return True
        return self._running.get(tenant, 0) < TEAM_THREADS and self._tenants_busy < TEAMS_THREADS

    def _start(self, job: _Job) -> None:
        if job.expiry is not None:
            job.expiry.cancel()  # running, it is stopped at its deadline by the backend
        _add(self._running, job.tenant, 1)
        self._served[job.tenant] = self._starts
        self._starts += 1
        self._busy += 1
        self._tenants_busy += job.capped
        loop = asyncio.get_running_loop()
        ran = self._pool.submit(job.call)
        ran.add_done_callback(lambda f: _back_to(loop, self._ended, job, f))

    def _ended(self, job: _Job, ran: Future[Any]) -> None:
        _add(self._running, job.tenant, -1)
        self._busy -= 1
        self._tenants_busy -= job.capped
        if job.tenant not in self._running and job.tenant not in self._lines:
            self._served.pop(job.tenant, None)  # idle: its next query is first in line
        self.release(job.who)
        if job.done.done():  # cancelled: its client is gone
            pass
        elif ran.cancelled():  # never ran: the pool was shut down
            job.done.cancel()
        elif (err := ran.exception()) is not None:
            job.done.set_exception(err)
        else:
            job.done.set_result(ran.result())
        self._dispatch()


def _back_to(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: the app is gone with its gate
        loop.call_soon_threadsafe(fn, *args)


def _add(counts: dict[str, int], name: str, n: int) -> None:
    if (left := counts.get(name, 0) + n) > 0:
        counts[name] = left
    else:
        counts.pop(name, None)


def _capped(name: str) -> bool:
    return name.startswith(_TENANT_PREFIXES)


def _tenant(who: list[Holder]) -> str:
    """The line a query waits in: its tenant's (its team's, or a solo key's own), else its
    caller's own."""
    return who[-1][0] if _capped(who[-1][0]) else who[0][0]


def _class(who: list[Holder]) -> str:
    return TENANTS if _capped(_tenant(who)) else OPERATOR


GATE = web.AppKey("query_gate", Gate)


def _holders(request: web.Request, per_key: int) -> list[Holder]:
    """Whom a query counts against: the key (a keyless admin from loopback: its address) and,
    for a team's key, the team, which may have twice a key's (so that one team's many keys
    cannot fill the pool for the others and the operator). A key of no team below `operator`
    (a viewer's dashboard) is a tenant of its own ("solo:"): the operator's thread is not its."""
    ident = request.get(IDENTITY)
    if ident is None:
        return [(f"peer:{request.remote}", per_key, "This client")]
    if ident.team is None and not roles.permits(ident.role, "operator"):
        return [(f"solo:{ident.key}", per_key, "This key")]
    out = [(f"key:{ident.key}", per_key, "This key")]
    if ident.team is not None:
        out.append((f"team:{ident.team}", 2 * per_key, f"Team {ident.team!r}"))
    return out


def _settings(request: web.Request) -> tuple[int, float]:
    state = request.app.get(STATE)
    if state is None:  # an app without the live config (a unit test's)
        return 2, 10.0
    rl = state.live.config.request_log
    return rl.max_queries_per_key, rl.query_timeout_s


async def run(request: web.Request, fn: Callable[[Bounded], _T], backend: Backend) -> _T:
    """`fn` on the query pool with the caller's backend, bounded by `run_until`'s deadline."""
    return await run_until(request, lambda end: fn(Bounded(backend, 0, end)))


NARROW = "a shorter `since`, or filters that the indexes serve (key, team, model, route), or a smaller page"


async def run_until(request: web.Request, fn: Callable[[float], _T], narrow: str = NARROW) -> _T:
    """`fn(end)` on the query pool, answered within the deadline from now (the wait for a slot
    and for a thread included): `fn` stops its reads at `end` (monotonic) with TimeoutError, a
    503 `query_timeout` saying how to `narrow` it. The caller's slots are freed when the query
    ends (a client that hangs up does not free a running query's early, so hanging up and asking
    again cannot pass the limit)."""
    gate = request.app.get(GATE)
    if gate is None:
        raise RuntimeError("requestlog.gate.install was not called")
    per_key, timeout_s = _settings(request)
    end = time.monotonic() + timeout_s
    who = _holders(request, per_key)
    await _admitted(gate, who, min(timeout_s / 2, MAX_LINE_WAIT_S))
    try:
        job = gate.submit(who, lambda: fn(end), end)
    except BaseException:
        gate.release(who)
        raise
    try:
        return cast(_T, await job.done)
    except asyncio.CancelledError:
        gate.withdraw(job)
        raise
    except TimeoutError:  # QueryTimeout, or the store's own
        raise ProxyError(
            503,
            f"The query took longer than {timeout_s:g} s and was stopped. Narrow it: {narrow}.",
            code="query_timeout",
        ) from None


async def _admitted(gate: Gate, who: list[Holder], wait_s: float) -> None:
    """Admits the query, a query past its key's or team's limit after waiting in line for a
    while (the console loads a page's panels at once: seven on the routing page), at most
    LINE_PER_KEY of a key's at a time; past that, or once the wait is over, the 429."""
    end = time.monotonic() + wait_s
    line = who[0][0]
    while True:
        try:
            return gate.admit(who)
        except ProxyError as e:
            if e.status != 429 or time.monotonic() >= end or gate.waiting.get(line, 0) >= LINE_PER_KEY:
                raise
        _add(gate.waiting, line, 1)
        try:
            await asyncio.sleep(_LINE_POLL_S)
        finally:
            _add(gate.waiting, line, -1)


def install(app: web.Application) -> None:
    app[GATE] = gate = Gate()

    async def close(_: web.Application) -> None:
        gate.close()

    app.on_cleanup.append(close)
