"""The candidate router's choice for live requests, off the request path.

The request path hands each answered, policy-routed request (a sample of them: `percent`)
to `Evaluator.observe`: a bounded append, nothing more. Every quarter second a worker
thread asks the candidate (a second core compiled from the running config with the
candidate's router file) where it would have sent each one, for the client's key as the
running router did, and queues one `router_shadow` row per request for the ledger's
next batch: both routes and the cost of each at its first deployment's price for the
answer's own token counts. Nothing a client sees changes. Past `MAX_WAITING` requests or
`MAX_WAITING_BYTES` of bodies waiting (a stalled worker), new ones are dropped and counted
rather than held in memory.

`GET /admin/router/shadow` reports the difference (`report.py`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord, Usage, cost_of
from edgeroute.config import Config
from edgeroute.core import ConfigError, learned_models
from edgeroute.cost.keys import Identity
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.prices import apply_windows
from edgeroute.errors import ProxyError
from edgeroute.requestlog import outcomes
from edgeroute.requestlog.query import BadParam
from edgeroute.router_shadow import report
from edgeroute.shadow import CANDIDATE_ROUTER, decide_as
from edgeroute.state import RECORDER, Live

log = logging.getLogger("edgeroute.router_shadow")

MAX_WAITING = 10_000
MAX_WAITING_BYTES = 64 << 20
EVERY_S = 0.25


@dataclass(slots=True)
class _Seen:
    live: Live
    body: bytes
    ident: Identity | None
    request_id: str
    model: str
    running_route: str
    running_first: int  # the deployment the running router put first
    usage: Usage
    cost_usd: float
    ts: float


class Evaluator:
    """Computes and records the candidate's choices; `name` tells candidates apart in the log."""

    def __init__(self, name: str, model: bytes, percent: float, ledger: Ledger) -> None:
        self.name = name
        self.model = model
        self.percent = percent
        self.ledger = ledger
        self.evaluated = 0
        self.dropped = 0
        self.failed = 0
        self._waiting: collections.deque[_Seen] = collections.deque()
        # Bytes of bodies queued and taken: each written by one thread only (the loop, the worker).
        self._added = 0
        self._taken = 0
        self._lock = threading.Lock()  # one worker at a time (the loop's and the last one at close)
        self._built: tuple[Config, _core.Router] | None = None
        self._rng = random.Random()

    def observe(
        self, live: Live, body: bytes, decision: _core.Decision, rec: RequestRecord, ident: Identity | None
    ) -> None:
        """On the request path: remembers an answered request a policy routed (if sampled)."""
        if decision.policy is None or not decision.order:
            return
        if self.percent < 100 and self._rng.random() * 100 >= self.percent:
            return
        if len(self._waiting) >= MAX_WAITING or self._added - self._taken + len(body) > MAX_WAITING_BYTES:
            self.dropped += 1
            return
        usage = next((a.usage for a in reversed(rec.attempts) if a.usage is not None), None)
        seen = _Seen(
            live, body, ident, rec.request_id, rec.model, decision.route, decision.order[0],
            usage or Usage(decision.prompt_tokens, 0), sum(a.cost_usd for a in rec.attempts), rec.started,
        )  # fmt: skip
        self._added += len(body)
        self._waiting.append(seen)

    def _router(self, live: Live) -> _core.Router:
        """The candidate compiled for the generation of config `live` runs (rebuilt on reload)."""
        if self._built is None or self._built[0] is not live.config:
            task, _ = learned_models(live.config, live.source)
            router = _core.Router(live.config.core_json(), task, self.model)
            apply_windows(router, [(d.index, d.price) for d in live.deployments])
            self._built = (live.config, router)
        return self._built[1]

    def evaluate_waiting(self) -> int:
        """Decides every waiting request with the candidate (in a worker thread); the number recorded."""
        with self._lock:
            return self._evaluate_waiting()

    def _evaluate_waiting(self) -> int:
        done = 0
        while self._waiting:
            s = self._waiting.popleft()
            self._taken += len(s.body)
            try:
                d = decide_as(s.live, s.body, s.ident, self._router(s.live))
                first = d.order[0]
            except Exception as e:  # a refusal by the candidate (or a bug) must never reach a client
                self.failed += 1
                log.info("candidate router could not decide request %s: %s", s.request_id, e)
                continue
            deps = s.live.deployments
            row = (
                s.request_id, self.name, s.ts, s.model, s.running_route, d.route,
                cost_of(deps[s.running_first].price, s.usage, s.ts), cost_of(deps[first].price, s.usage, s.ts),
                s.cost_usd,
            )  # fmt: skip
            self.ledger.outcome(outcomes.ROUTER_SHADOW, row)
            done += 1
        self.evaluated += done
        return done

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(EVERY_S)
                if self._waiting:
                    await asyncio.to_thread(self.evaluate_waiting)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(self.evaluate_waiting)  # before the ledger's last flush (cleaned up after)


def _ledger(app: web.Application) -> Ledger | None:
    rec = app.get(RECORDER)
    return rec if isinstance(rec, Ledger) and rec.request_log is not None else None


async def admin_report(request: web.Request) -> web.Response:
    """`GET /admin/router/shadow?since=24h&until=&candidate=`: the candidate against the running router."""
    ledger = _ledger(request.app)
    if ledger is None:
        raise ProxyError(404, "The shadow report reads the request log, which is off.", code="no_request_log")
    ev = request.app.get(CANDIDATE_ROUTER)
    current = ev.name if isinstance(ev, Evaluator) else None
    try:
        body = await asyncio.to_thread(report.build, ledger.backend, dict(request.query), current, time.time())
    except BadParam as e:
        raise ProxyError(400, f"Invalid parameter {e}", code="invalid_parameter", param=e.param) from None
    if isinstance(ev, Evaluator):
        body["evaluator"] = {"evaluated": ev.evaluated, "dropped": ev.dropped, "failed": ev.failed}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def candidate_name(path: Path, model: bytes) -> str:
    """The file's name and a digest of its bytes: a retrained file under the same name is another candidate."""
    return f"{path.name}@{hashlib.sha256(model).hexdigest()[:12]}"


def configured(config: Config, source: str) -> tuple[Path, bytes] | None:
    """The candidate router file the config names (path, bytes), or None; `ConfigError` if unreadable."""
    cand = config.learning.candidate_router
    if cand is None:
        return None
    path = Path(cand.router_model).expanduser()
    if not path.is_absolute() and not source.startswith("<"):
        path = Path(source).parent / path
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise ConfigError(f"learning.candidate_router.router_model: cannot read {path}: {e.strerror}") from None


def install(app: web.Application, config: Config, source: str) -> None:
    """Adds the report route and, with `learning.candidate_router`, the evaluator.

    Raises `ConfigError` for a candidate file that cannot be read or that the core refuses."""
    app.router.add_get("/admin/router/shadow", admin_report)
    found = configured(config, source)
    if found is None or config.learning.candidate_router is None:
        return
    path, model = found
    try:
        _core.Router(config.core_json(), learned_models(config, source)[0], model)
    except (ValueError, _core.EdgerouteError) as e:
        raise ConfigError(f"learning.candidate_router.router_model: {path}: {e}") from None
    ledger = _ledger(app)
    if ledger is None:
        log.warning("learning.candidate_router is set but the request log is off: no shadow evaluation")
        return
    ev = Evaluator(candidate_name(path, model), model, config.learning.candidate_router.percent, ledger)
    app[CANDIDATE_ROUTER] = ev
    app.cleanup_ctx.append(ev.ctx)
