"""The candidate router's choice for live requests, off the request path.

The request path hands each answered, policy-routed request (a sample of them: `percent`)
to `Evaluator.observe`: a bounded append, nothing more. A streamed answer is handed over by
the relay once the stream has ended cleanly (never a broken or abandoned one), costed by the
stream's own usage. Every quarter second a worker
thread asks the candidate (a second core compiled from the running config with the
candidate's router file) where it would have sent each one, for the client's key as the
running router did, and queues one `router_shadow` row per request for the ledger's
next batch: both routes and the cost of each at its first deployment's price for the
answer's own token counts. Nothing a client sees changes. Past `MAX_WAITING` requests or
`MAX_WAITING_BYTES` of bodies waiting (a stalled worker), new ones are dropped and counted
rather than held in memory.

`CandidateSlot` holds the candidate for the server's life and follows config reloads.
`GET /admin/router/shadow` reports the difference (`report.py`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.metrics_core import Metric

from edgeroute import _core, background
from edgeroute.accounting import RequestRecord, Usage, cost_of
from edgeroute.config import Config, Price
from edgeroute.core import ConfigError, learned_models
from edgeroute.cost.keys import Identity
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.prices import apply_windows
from edgeroute.errors import ProxyError
from edgeroute.metrics import METRICS, counter, gauge
from edgeroute.reload import CANDIDATE_RELOAD
from edgeroute.requestlog import gate, outcomes
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
    tags: list[str] | None  # the request's x-edgeroute-tags: a tag rule holds for the candidate too


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
        # The candidate for a config generation, and its deployments with price windows.
        self._built: tuple[Config, _core.Router, list[tuple[int, Price]]] | None = None
        self._rng = random.Random()

    def wanted(self, decision: _core.Decision) -> bool:
        """Whether a request so decided is evaluated: routed by a policy, and sampled."""
        if decision.policy is None or not decision.order:
            return False
        return self.percent >= 100 or self._rng.random() * 100 < self.percent

    def observe(
        self, live: Live, body: bytes, decision: _core.Decision, rec: RequestRecord, ident: Identity | None
    ) -> None:
        """On the request path: remembers an answered request a policy routed (if sampled)."""
        if self.wanted(decision):
            self.add(live, body, decision, rec, ident)

    def add(
        self, live: Live, body: bytes, decision: _core.Decision, rec: RequestRecord, ident: Identity | None
    ) -> None:
        """Queues an answered request for the worker (a bounded append)."""
        if len(self._waiting) >= MAX_WAITING or self._added - self._taken + len(body) > MAX_WAITING_BYTES:
            self.dropped += 1
            return
        usage = next((a.usage for a in reversed(rec.attempts) if a.usage is not None), None)
        seen = _Seen(
            live, body, ident, rec.request_id, rec.model, decision.route, decision.order[0],
            usage or Usage(decision.prompt_tokens, 0), sum(a.cost_usd for a in rec.attempts), rec.started,
            rec.tags,
        )  # fmt: skip
        self._added += len(body)
        self._waiting.append(seen)

    def _router(self, live: Live, at: float) -> _core.Router:
        """The candidate compiled for the generation of config `live` runs (rebuilt on reload),
        with the prices in force at `at` (when the request ran: the queue may cross a window's
        edge, and the running router chose by the prices of its time)."""
        if self._built is None or self._built[0] is not live.config:
            task, _ = learned_models(live.config, live.source)
            router = _core.Router(live.config.core_json(), task, self.model)
            self._built = (live.config, router, [(d.index, d.price) for d in live.deployments if d.price.windows])
        _, router, windowed = self._built
        apply_windows(router, windowed, at)
        return router

    def waiting(self) -> bool:
        return bool(self._waiting)

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
                d = decide_as(s.live, s.body, s.ident, self._router(s.live, s.ts), request_tags=s.tags)
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


Stream = Callable[[bytes], None]


@dataclass(frozen=True, slots=True)
class _Load:
    """What loading the configured candidate found."""

    found: tuple[str, bytes] | None = None  # (name, file bytes), compiled against the config once
    error: str | None = None  # why the configured file cannot be used
    keep: bool = False  # with an error: the current candidate still compiles against the config


class CandidateSlot:
    """The candidate under evaluation, for the server's life: loaded at start and again on every
    config reload (SIGHUP, `POST /admin/reload`, an applied or rolled-back version), so that a
    candidate added, retrained (new bytes: a new name) or removed takes effect without a restart.

    A candidate file that cannot be read or that the core refuses never fails the server's
    start or the rest of a reload: the previous candidate keeps being evaluated if it still
    compiles against the new config (else none is), and the failure is logged at error level,
    shown in `GET /admin/router/shadow` (`candidate_router.error`) and counted in `/metrics`.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.current: Evaluator | None = None
        self.error: str | None = None  # why the last load failed; None once one succeeds
        self.load_failures = 0
        self._retired: list[Evaluator] = []  # replaced, with requests still waiting
        self._reloads = 0

    # -- on the request path ---------------------------------------------------

    def observe(
        self, live: Live, body: bytes, decision: _core.Decision, rec: RequestRecord, ident: Identity | None
    ) -> None:
        if (ev := self.current) is not None:
            ev.observe(live, body, decision, rec, ident)

    def after_stream(
        self,
        live: Live,
        body: bytes,
        decision: _core.Decision,
        rec: RequestRecord,
        ident: Identity | None,
        then: Stream | None,
    ) -> Stream | None:
        """`then` (the stream's completion callback), also queueing the request for the candidate
        once its stream has ended cleanly: the relay calls it only then, after costing the
        attempt from the stream's usage. An interrupted stream is never evaluated."""
        ev = self.current
        if ev is None or not ev.wanted(decision):
            return then

        def completed(answer: bytes) -> None:
            if then is not None:
                then(answer)
            # Costed by the answer's token counts: the candidate's choice needs the prompt, not the text.
            ev.add(live, body, decision, rec, ident)

        return completed

    # -- loading -----------------------------------------------------------------

    def load(self, config: Config, source: str) -> None:
        """Loads the candidate `config` names at start (blocking: the server is not serving yet)."""
        self._swap(self._prepare(config, source), config)

    async def reload(self, live: Live) -> None:
        """Follows a config just applied; never raises (the reload of the rest stands)."""
        self._reloads += 1
        mine = self._reloads
        try:
            got = await asyncio.to_thread(self._prepare, live.config, live.source)
            if mine == self._reloads:  # else a later reload, applied meanwhile, decides
                self._swap(got, live.config)
        except Exception:  # a bug here must not turn an applied config into a failed reload
            log.exception("candidate router: reload failed; keeping the previous candidate")

    def _prepare(self, config: Config, source: str) -> _Load:
        """The candidate `config` names, validated against it (in a worker thread on reload)."""
        current = self.current
        try:
            found = configured(config, source)
            if found is None:
                return _Load()
            path, model = found
            name = candidate_name(path, model)
            _compile(config, source, model, path)
        except ConfigError as e:
            # The previous candidate goes on only if it still fits the config (its routes, its models).
            keep = current is not None and _compiles(config, source, current.model)
            return _Load(error=str(e), keep=keep)
        return _Load(found=(name, model))

    def _swap(self, got: _Load, config: Config) -> None:
        old = self.current
        if got.error is not None:
            self.error = got.error
            self.load_failures += 1
            kept = old is not None and got.keep
            log.error(
                "candidate router not loaded, %s: %s",
                f"still evaluating {old.name}" if kept and old is not None else "none is evaluated",
                got.error,
            )
            if not kept:
                self._retire()
            return
        self.error = None
        cand = config.learning.candidate_router
        if got.found is None or cand is None:
            if old is not None:
                log.info("candidate router %s removed from the config: no longer evaluated", old.name)
            self._retire()
            return
        name, model = got.found
        if old is not None and old.name == name:
            old.percent = cand.percent  # the same file: its counts go on
            return
        self._retire()
        self.current = Evaluator(name, model, cand.percent, self.ledger)
        log.info("candidate router %s: evaluating %g %% of policy-routed requests", name, cand.percent)

    def _retire(self) -> None:
        if self.current is not None:
            self._retired.append(self.current)  # its waiting requests are still evaluated
            self.current = None

    # -- the worker ----------------------------------------------------------------

    def _busy(self) -> list[Evaluator]:
        self._retired = [ev for ev in self._retired if ev.waiting()]
        return [ev for ev in (self.current, *self._retired) if ev is not None and ev.waiting()]

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(EVERY_S)
                for ev in self._busy():
                    await asyncio.to_thread(ev.evaluate_waiting)

        task = asyncio.create_task(loop())
        yield
        await background.stop(task)
        for ev in self._busy():  # before the ledger's last flush (cleaned up after)
            await asyncio.to_thread(ev.evaluate_waiting)

    def status(self) -> dict[str, Any]:
        """For `GET /admin/router/shadow`."""
        ev = self.current
        return {"loaded": ev.name if ev else None, "error": self.error, "load_failures": self.load_failures}

    def metrics(self, app: web.Application) -> Iterable[Metric]:
        ev = self.current
        yield gauge(
            "edgeroute_candidate_router_loaded",
            "1 while a candidate router is shadow-evaluated.",
            float(ev is not None),
        )
        yield gauge(
            "edgeroute_candidate_router_load_failed",
            "1 while the configured candidate router file could not be loaded (see the log).",
            float(self.error is not None),
        )
        yield counter(
            "edgeroute_candidate_router_load_failures", "Candidate router loads that failed.", self.load_failures
        )
        for name, value in (("evaluated", "evaluated"), ("dropped", "dropped"), ("failed", "failed")):
            yield counter(
                f"edgeroute_candidate_router_{name}",
                f"Requests the current candidate router {_HELP[name]}.",
                getattr(ev, value) if ev else 0,
            )


_HELP = {
    "evaluated": "decided (its choice recorded)",
    "dropped": "did not see: too many waiting",
    "failed": "could not decide",
}


def _compile(config: Config, source: str, model: bytes, what: object) -> None:
    """Raises `ConfigError` when the core refuses `model` (the file `what`) as a router for `config`."""
    try:
        _core.Router(config.core_json(), learned_models(config, source)[0], model)
    except (ValueError, _core.EdgerouteError) as e:
        raise ConfigError(f"learning.candidate_router.router_model: {what}: {e}") from None


def _compiles(config: Config, source: str, model: bytes) -> bool:
    try:
        _compile(config, source, model, "")
    except ConfigError:
        return False
    return True


def _ledger(app: web.Application) -> Ledger | None:
    rec = app.get(RECORDER)
    return rec if isinstance(rec, Ledger) and rec.request_log is not None else None


async def admin_report(request: web.Request) -> web.Response:
    """`GET /admin/router/shadow?since=24h&until=&candidate=`: the candidate against the running router."""
    ledger = _ledger(request.app)
    if ledger is None:
        raise ProxyError(404, "The shadow report reads the request log, which is off.", code="no_request_log")
    slot = request.app.get(CANDIDATE_ROUTER)
    slot = slot if isinstance(slot, CandidateSlot) else None
    ev = slot.current if slot is not None else None
    q, current, now = dict(request.query), ev.name if ev else None, time.time()
    try:
        # On the operator's query pool, under its deadline and per-key limits (redU H1: on the
        # default executor, unbounded, a viewer's reports stalled the request path's large bodies).
        body = await gate.run(request, lambda bounded: report.build(bounded, q, current, now), ledger.backend)
    except BadParam as e:
        msg = f"Invalid parameter {e}"
        if slot is not None and slot.error is not None:
            msg += f"; the configured candidate router could not be loaded: {slot.error}"
        raise ProxyError(400, msg, code="invalid_parameter", param=e.param) from None
    if ev is not None:
        body["evaluator"] = {"evaluated": ev.evaluated, "dropped": ev.dropped, "failed": ev.failed}
    if slot is not None:
        body["candidate_router"] = slot.status()
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
    """Adds the report route and, with the request log on, the slot that evaluates the
    candidate router the config names now or after a reload."""
    app.router.add_get("/admin/router/shadow", admin_report)
    ledger = _ledger(app)
    if ledger is None:
        if config.learning.candidate_router is not None:
            log.warning("learning.candidate_router is set but the request log is off: no shadow evaluation")
        return
    slot = CandidateSlot(ledger)
    slot.load(config, source)
    app[CANDIDATE_ROUTER] = slot
    app[CANDIDATE_RELOAD] = slot
    app[METRICS].sources.append(slot.metrics)
    app.cleanup_ctx.append(slot.ctx)
