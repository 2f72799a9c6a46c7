"""Where the operator's queries run: the request log's pages and stats, and the spend reports.

They run on a small pool of their own (QUERY_THREADS), never on the default executor that the
request path (large bodies' scans, token counts) and the key store share: a viewer's slow
queries, however many, wait here, not in front of a revocation or a long prompt. Each key has at
most `request_log.max_queries_per_key` of them in flight and a team's keys together twice that
(a few more wait briefly for a slot, then 429 `too_many_queries`), the pool at most MAX_WAITING
(503 `queries_busy`), and each query `request_log.query_timeout_s` (503 `query_timeout`, saying
how to narrow it): SQLite stops it from a progress handler, PostgreSQL by the transaction's
`statement_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from edgeroute.cost.keys import IDENTITY
from edgeroute.cost.ledger_store import Backend, PostgresBackend, SqliteBackend
from edgeroute.errors import ProxyError
from edgeroute.state import STATE

_T = TypeVar("_T")

QUERY_THREADS = 2
MAX_WAITING = 8  # running and queued, all keys together
# A query past its key's or team's limit waits for a slot (half its deadline, at most this
# long; at most LINE_PER_KEY of a key's) before its 429: a console page's panels come at once.
MAX_LINE_WAIT_S = 5.0
LINE_PER_KEY = 16
_LINE_POLL_S = 0.05
_PROGRESS_STEPS = 1000  # SQLite VM steps between deadline checks (well under a millisecond)
_POOL = ThreadPoolExecutor(max_workers=QUERY_THREADS, thread_name_prefix="edgeroute-query")


class QueryTimeout(Exception):
    """A query ran past its deadline and was stopped."""


class Bounded:
    """A backend's reads (`dialect`, `query`) under one deadline for all of a call's statements."""

    def __init__(self, backend: Backend, timeout_s: float) -> None:
        self.dialect = backend.dialect
        self._backend = backend
        self._end = time.monotonic() + timeout_s

    def _left(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise QueryTimeout
        return left

    def query(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        left = self._left()
        if isinstance(self._backend, SqliteBackend):
            return self._sqlite(self._backend.path, sql, params, left)
        if isinstance(self._backend, PostgresBackend):
            return _postgres(self._backend, sql, params, left)
        return self._backend.query(sql, params)

    def _sqlite(self, path: str, sql: str, params: Any, left: float) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=min(10.0, left), isolation_level=None)
        with contextlib.closing(conn):
            # A non-zero return aborts the statement ("interrupted"): the deadline has passed.
            conn.set_progress_handler(lambda: int(time.monotonic() > self._end), _PROGRESS_STEPS)
            try:
                return list(conn.execute(sql, tuple(params)).fetchall())
            except sqlite3.OperationalError as e:
                # Stopped by the handler, or still locked out (busy) when the deadline came.
                if "interrupt" in str(e) or time.monotonic() >= self._end:
                    raise QueryTimeout from None
                raise


def _postgres(backend: PostgresBackend, sql: str, params: Any, left: float) -> list[tuple[Any, ...]]:
    canceled = backend._psycopg.errors.QueryCanceled
    with backend._reader() as conn:  # the backend's kept read connections
        try:
            with conn.transaction():  # SET LOCAL: the timeout ends with it, the kept connection has none
                conn.execute(f"SET LOCAL statement_timeout = {max(1, int(left * 1000))}")
                return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]
        except canceled:
            raise QueryTimeout from None


class Gate:
    """Counts of the queries in flight (queued or running), by key, by team and in all; changed
    from the loop (admission) and from the pool's threads (a query's end), so under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held: dict[str, int] = {}  # "key:<id>", "peer:<address>", "team:<name>"
        self.waiting: dict[str, int] = {}  # a key's queries waiting for a slot (loop only)
        self.total = 0

    def admit(self, holders: list[tuple[str, int, str]]) -> None:
        """`holders`: (counter, its limit, who it is in a refusal) for the key and its team."""
        with self._lock:
            for name, limit, who in holders:
                if self.held.get(name, 0) >= limit:
                    raise ProxyError(
                        429,
                        f"{who} already has {limit} request-log or spend queries in flight; wait for them to"
                        " finish before sending more.",
                        code="too_many_queries",
                        headers={"Retry-After": "1"},
                    )
            if self.total >= MAX_WAITING:
                raise ProxyError(
                    503,
                    "Too many request-log and spend queries are waiting; try again shortly.",
                    code="queries_busy",
                    headers={"Retry-After": "1"},
                )
            for name, _, _ in holders:
                self.held[name] = self.held.get(name, 0) + 1
            self.total += 1

    def release(self, holders: list[tuple[str, int, str]]) -> None:
        with self._lock:
            self.total -= 1
            for name, _, _ in holders:
                if (n := self.held.get(name, 0) - 1) > 0:
                    self.held[name] = n
                else:
                    self.held.pop(name, None)


GATE = web.AppKey("query_gate", Gate)


def _holders(request: web.Request, per_key: int) -> list[tuple[str, int, str]]:
    """Whom a query counts against: the key (a keyless admin from loopback: its address) and,
    for a team's key, the team, which may have twice a key's (so that one team's many keys
    cannot fill the pool for the others and the operator)."""
    ident = request.get(IDENTITY)
    if ident is None:
        return [(f"peer:{request.remote}", per_key, "This client")]
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
    """`fn` on the query pool with the caller's backend under the deadline; the caller's slot
    is freed when the query ends (a client that hangs up does not free it early, so hanging up
    and asking again cannot pass the limit)."""
    gate = request.app.get(GATE)
    if gate is None:
        raise RuntimeError("requestlog.gate.install was not called")
    per_key, timeout_s = _settings(request)
    who = _holders(request, per_key)
    await _admitted(gate, who, min(timeout_s / 2, MAX_LINE_WAIT_S))
    try:
        done: Future[_T] = _POOL.submit(lambda: fn(Bounded(backend, timeout_s)))
    except BaseException:
        gate.release(who)
        raise
    done.add_done_callback(lambda _: gate.release(who))
    try:
        return await asyncio.wrap_future(done)
    except QueryTimeout:
        raise ProxyError(
            503,
            f"The query took longer than {timeout_s:g} s and was stopped. Narrow it: a shorter `since`, or"
            " filters that the indexes serve (key, team, model, route), or a smaller page.",
            code="query_timeout",
        ) from None


async def _admitted(gate: Gate, who: list[tuple[str, int, str]], wait_s: float) -> None:
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
        gate.waiting[line] = gate.waiting.get(line, 0) + 1
        try:
            await asyncio.sleep(_LINE_POLL_S)
        finally:
            if (n := gate.waiting[line] - 1) > 0:
                gate.waiting[line] = n
            else:
                del gate.waiting[line]


def install(app: web.Application) -> None:
    app[GATE] = Gate()
