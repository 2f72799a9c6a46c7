"""Feedback learning: `POST /v1/feedback` scores shift routing over time, within bounds.

For each (task class, route) the learner keeps a Beta posterior of "the answer was
good", updated with each feedback score (0..1) less a cost penalty, so that a cheap
route that users rate well earns traffic and an expensive one must earn its price.
Thompson sampling turns the posteriors into the per-route score shifts the core adds
to its predictions for `policy` routes: a fresh draw from each posterior, minus the
prior mean, clamped to `max_shift`. Draws are refreshed on every feedback and every
few seconds, so exploration continues without a random number per request.

Ratings are kept per tenant (the rated request's team; the operator's tenant: keys of no team
with role `operator` or `admin`, shared `server.api_keys` and keyless callers; any other key of
no team is a tenant of its own, `key:<id>`, which steers no one's routing with `per_team` and
is weighed as a team is with `balanced`). With `tenants: per_team` (the default) a
team's ratings shift its own requests alone: the core keeps a table of shifts per team beside
the global one, which the operator's tenant's ratings make and every request sees (`routing`).
With `balanced` there is one table, where a team's ratings count up to all the others'
together (`pool`); with `pooled`, one table where every rating counts. Only a route a policy or
an experiment chose is learned from: a cache hit (its route was not chosen by routing now) and a
route the client named itself (`model: weak`) are remembered, answered `learned: false`.

State persists in a small JSON file (written atomically) so that learning survives
restarts; with `shared_state`, posteriors and recent requests are shared through Redis,
and between the workers of one `serve --workers N` through a file (`learning_share.py`).
The learner never blocks the request path: feedback is an in-memory update; the file
write happens in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
from aiohttp import web

from edgeroute import background, roles
from edgeroute.atomic_file import replace_file
from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY, tenant_of
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.limits import LocalLimiter, Take
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.errors import ProxyError
from edgeroute.governance.http import only_params
from edgeroute.governance.runtime import GOV, actor_of
from edgeroute.requestlog import outcomes
from edgeroute.state import RECORDER, STATE

log = logging.getLogger("edgeroute.learning")


@dataclass(slots=True)
class Posterior:
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


# The operator's tenant: keys of no team with role `operator` or above (global keys, which see
# every team) and callers without a key (a sidecar, `server.api_keys`). Its ratings count in full.
ANONYMOUS = "anonymous"
# How long a served request can be rated (the shared store keeps its record and mark as long).
REMEMBER_S = 24 * 3600


def tenant_id(team: str | None, key: str | None = None, role: str | None = None) -> str:
    """Whose ratings these are: the key's team; else the operator's tenant for a keyless caller
    or a no-team key of role `operator` or above (as the admin queries count it); else the key's
    own (a plain `service` key of no team does not speak for the operator)."""
    if team:
        return f"team:{team}"
    if key is None or roles.permits(role, "operator"):
        return ANONYMOUS
    return f"key:{key}"


@dataclass(slots=True)
class Served:
    """What feedback needs to know about a recent request."""

    route: str
    task: str
    cost_usd: float
    key: str | None = None  # whose request it was: only that key (or an admin over it) rates it
    team: str | None = None
    cached: bool = False  # a cache hit: no routing outcome, so not learned from
    rated: bool = False  # the learner counts a request's first score only
    role: str | None = None  # the key's role: a no-team key below `operator` is a tenant of its own
    chosen: bool = True  # a policy or an experiment chose the route (else the client named it)
    at: float = 0.0  # when it was served (monotonic): rateable for `REMEMBER_S`

    @property
    def tenant(self) -> str:
        return tenant_id(self.team, self.key, self.role)

    def not_learned(self) -> str | None:
        """Why a score on it teaches the router nothing, or None when it does."""
        if self.cached:
            return NOT_LEARNED
        if not self.chosen:
            return NOT_CHOSEN
        return ALREADY_SCORED if self.rated else None


NOT_LEARNED = "a cached answer: its route was not chosen by routing now, so its score does not teach the router"
NOT_CHOSEN = "not_chosen_by_routing"  # the client named the route: its score would steer others' routing
ALREADY_SCORED = "already_scored"  # a request's first score counts, once
NOT_SHARED = "not_in_shared_store"  # the shared store no longer holds it (expired, flushed): it may have counted


Evidence = dict[str, tuple[float, float]]  # tenant -> (sum of rewards, sum of complements)
Scope = tuple[str | None, str | None, str | None]  # what a reset clears: task, route, tenant (None: any)


def in_scope(scope: Scope, task: str, route: str, tenant: str) -> bool:
    return all(want is None or want == got for want, got in zip(scope, (task, route, tenant), strict=True))


Tenants = Literal["per_team", "balanced", "pooled"]  # `learning.feedback.tenants`
TEAM = "team:"  # a team tenant's prefix (`tenant_id`)


def pool(by_tenant: Evidence, prior: tuple[float, float], balanced: bool) -> Posterior:
    """The posterior routing uses: the prior plus each tenant's evidence, which, when
    `balanced`, weighs at most all other tenants' together for a team (a team alone: nothing)
    and in full for the operator's tenant (keys of no team and keyless callers)."""
    alpha, beta = prior
    total = sum(a + b for a, b in by_tenant.values())
    for tenant, (a, b) in by_tenant.items():
        n = a + b
        trusted = not balanced or tenant == ANONYMOUS or n <= 0
        weight = 1.0 if trusted else min(1.0, (total - n) / n)
        alpha, beta = alpha + weight * a, beta + weight * b
    return Posterior(alpha, beta)


def routing(
    by_tenant: Evidence, prior: tuple[float, float], tenants: Tenants
) -> tuple[Posterior, dict[str, Posterior]]:
    """The posterior every request's routing draws from, and per team (`per_team` only) the one
    its own requests draw from: the operator's evidence and that team's. `per_team` keeps the
    teams' ratings out of the global posterior; `balanced` and `pooled` count them in it (`pool`)."""
    if tenants != "per_team":
        return pool(by_tenant, prior, tenants == "balanced"), {}
    operator = {t: e for t, e in by_tenant.items() if t == ANONYMOUS}
    teams = {
        tenant.removeprefix(TEAM): pool(operator | {tenant: sums}, prior, balanced=False)
        for tenant, sums in by_tenant.items()
        if tenant.startswith(TEAM)
    }
    return pool(operator, prior, balanced=False), teams


def _evidence_rows(data: dict[str, Any], prior: tuple[float, float]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """(task, route, tenant) -> evidence, from a state file; one from before ratings were kept
    per tenant holds posteriors only, counted as the anonymous tenant's."""
    if "evidence" in data:
        return {(r["task"], r["route"], r["tenant"]): (float(r["a"]), float(r["b"])) for r in data["evidence"]}
    return {
        (r["task"], r["route"], ANONYMOUS): (float(r["alpha"]) - prior[0], float(r["beta"]) - prior[1])
        for r in data.get("posteriors", [])
    }


class Sharing(Protocol):
    """Where a learner shares what it learns with other instances (`learning_share.py`)."""

    def on_served(self, request_id: str, s: Served) -> None: ...
    def on_feedback(self, s: Served, reward: float) -> None: ...  # counted as `s.tenant`'s
    async def lookup(self, request_id: str) -> Served | None: ...
    async def claim(self, request_id: str) -> str | None: ...  # None: claimed; else why not
    async def reset(self, scope: Scope) -> None: ...  # the evidence in `scope` removed everywhere


def _epoch(data: dict[str, Any]) -> int:
    """How many learning resets a state file's evidence had seen (`POST /admin/learning/reset`)."""
    return int(data.get("epoch", 0))


def _keep_ahead(learner: FeedbackLearner, path: Path) -> dict[tuple[str, str], Evidence] | None:
    """Processes that share a learner save the one file: each its view as of its last sync.
    Evidence only grows, so per (task, route, tenant) the larger saved sums are the later view;
    keeping them means a process that synced earlier never writes back less than is known. None
    when the file was saved after a reset this process has not seen yet (it is not written over)."""
    merged = {k: dict(v) for k, v in learner.evidence.items()}
    try:
        data = json.loads(path.read_text())
        if _epoch(data) > learner.epoch:  # saved after a reset this process has yet to see
            return None
        if _epoch(data) < learner.epoch:  # saved before a reset: none of it is ahead
            return merged
        ahead = _evidence_rows(data, learner.prior)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return merged
    for (task, route, tenant), (a, b) in ahead.items():
        mine = merged.setdefault((task, route), {})
        have = mine.get(tenant, (0.0, 0.0))
        mine[tenant] = (max(have[0], a), max(have[1], b))
    return merged


class FeedbackLearner:
    share: Sharing | None = None

    def __init__(
        self,
        state_path: Path | None,
        *,
        max_shift: float = 0.15,
        cost_weight: float = 0.0,
        prior: tuple[float, float] = (1.0, 1.0),
        tenants: Tenants = "per_team",
        remember: int = 100_000,
        seed: int | None = None,
    ) -> None:
        self.state_path = state_path
        self.max_shift = max_shift
        self.cost_weight = cost_weight
        self.prior = prior
        self.tenants: Tenants = tenants
        self.evidence: dict[tuple[str, str], Evidence] = {}  # (task, route) -> per tenant
        self.posteriors: dict[tuple[str, str], Posterior] = {}  # every request's, from the evidence
        self.team_posteriors: dict[tuple[str, str], dict[str, Posterior]] = {}  # a team's own requests'
        self.recent: OrderedDict[str, Served] = OrderedDict()
        self.epoch = 0  # learning resets seen (`reset`): a file or store from before one is not merged back
        self.remember = remember
        self.rng = random.Random(seed)
        self._write_lock = threading.Lock()
        if state_path is not None and state_path.exists():
            self._load(state_path)

    # -- state ---------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            rows = _evidence_rows(data, self.prior)
            self.epoch = _epoch(data)
            found: dict[tuple[str, str], Evidence] = {}
            for (task, route, tenant), sums in rows.items():
                found.setdefault((task, route), {})[tenant] = sums
            self.set_evidence(found)
        except OSError as e:
            log.warning("ignoring unreadable learning state %s: %s", path, e)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Set aside, not overwritten by the first save: what was learned may be recovered by hand.
            self.evidence.clear()
            self.posteriors.clear()
            self.team_posteriors.clear()
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}-{os.getpid()}")
            try:
                path.rename(aside)
            except OSError:
                aside = path
            log.warning(
                "ignoring unreadable learning state %s (%s); kept as %s, learning starts afresh", path, e, aside
            )

    def snapshot(
        self, evidence: dict[tuple[str, str], Evidence] | None = None, *, team: str | None = None
    ) -> dict[str, Any]:
        """The posteriors of every score received (as before tenants were kept), the ones every
        request's routing draws from (`routing`), each team's own (`teams`, `per_team`) and
        each tenant's evidence. With `team` (a team-bound viewer): that team's view, in which
        no other team's ratings show (`posteriors` and `routing` hold the operator's and its own)."""
        evidence = self.evidence if evidence is None else evidence
        if team is not None:
            mine = {ANONYMOUS, tenant_id(team)}
            evidence = {k: {t: e for t, e in v.items() if t in mine} for k, v in evidence.items()}
            evidence = {k: v for k, v in evidence.items() if v}

        def row(task: str, route: str, p: Posterior) -> dict[str, Any]:
            return {"task": task, "route": route, "alpha": p.alpha, "beta": p.beta, "mean": round(p.mean, 4)}

        everything = {k: pool(v, self.prior, balanced=False) for k, v in sorted(evidence.items())}
        routed = {k: routing(v, self.prior, self.tenants) for k, v in sorted(evidence.items())}
        per_tenant = [
            {"task": t, "route": r, "tenant": tenant, "a": a, "b": b}
            for (t, r), by_tenant in sorted(evidence.items())
            for tenant, (a, b) in sorted(by_tenant.items())
        ]
        teams = [
            row(t, r, p) | {"team": name}
            for (t, r), (_, by_team) in routed.items()
            for name, p in sorted(by_team.items())
        ]
        return {
            "posteriors": [row(t, r, p) for (t, r), p in everything.items()],
            "routing": [row(t, r, glob) for (t, r), (glob, _) in routed.items()],
            "teams": teams,
            "evidence": per_tenant,
            "tenants": self.tenants,
            "epoch": self.epoch,
            "max_shift": self.max_shift,
            "cost_weight": self.cost_weight,
        }

    def save(self) -> None:
        if self.state_path is None:
            return
        with self._write_lock:
            shared = self.share is not None
            ahead = _keep_ahead(self, self.state_path) if shared else self.evidence
            if ahead is None:
                return
            snapshot = self.snapshot(ahead)
            # A temporary file of its own: the workers of one `serve --workers N` share the
            # path, and one fixed name let one rename the other's file away mid-write.
            replace_file(self.state_path, json.dumps(snapshot, indent=1).encode())

    # -- learning ------------------------------------------------------------

    def served(
        self,
        request_id: str,
        route: str,
        task: str | None,
        cost_usd: float,
        *,
        key: str | None = None,
        team: str | None = None,
        cached: bool = False,
        role: str | None = None,
        chosen: bool = True,
    ) -> None:
        """Remembers a request so that feedback on it can be attributed (and checked: whose it is)."""
        if task is None:
            return
        served = Served(route, task, cost_usd, key, team, cached, role=role, chosen=chosen)
        self.remember_served(request_id, served)
        if self.share is not None:
            self.share.on_served(request_id, served)

    def remember_served(self, request_id: str, served: Served) -> None:
        """Keeps `served` for `REMEMBER_S` (and at most `remember` requests), as the shared store
        keeps its record: oldest first out, so the expired are always at the front."""
        served.at = now = time.monotonic()
        self.recent[request_id] = served
        self.recent.move_to_end(request_id)
        if len(self.recent) > self.remember:
            self.recent.popitem(last=False)
        while self.recent and next(iter(self.recent.values())).at <= now - REMEMBER_S:
            self.recent.popitem(last=False)

    def known(self, request_id: str) -> Served | None:
        """The request as served here (or looked up), unless older than `REMEMBER_S`."""
        s = self.recent.get(request_id)
        return s if s is not None and s.at > time.monotonic() - REMEMBER_S else None

    def feedback(self, request_id: str, score: float, *, claimed: bool = False) -> Served | None:
        """Applies a 0..1 score to the request's (task, route); None if the request is unknown.

        A request's first score counts, once: a repeated one (a replay, a changed mind)
        leaves the posteriors alone, else one key could drive a route's posterior, which
        routes every tenant's requests, by repeating one score (the request log keeps the
        last score given). `claimed`: the shared store gave this call the first score, which
        counts even if a concurrent call marked the local copy rated meanwhile."""
        s = self.known(request_id)
        if s is None:
            return None
        if s.cached or not s.chosen or (s.rated and not claimed):
            return s
        s.rated = True
        reward = min(1.0, max(0.0, score - self.cost_weight * s.cost_usd))
        by_tenant = self.evidence.setdefault((s.task, s.route), {})
        a, b = by_tenant.get(s.tenant, (0.0, 0.0))
        by_tenant[s.tenant] = (a + reward, b + 1.0 - reward)
        self._route((s.task, s.route), by_tenant)
        if self.share is not None:
            self.share.on_feedback(s, reward)
        return s

    def set_evidence(self, found: dict[tuple[str, str], Evidence]) -> None:
        """Replaces the evidence of each (task, route) in `found` (a state file, a shared sync:
        `LearningShare.sync` passes sums that never fall below what this process counted)."""
        for key, by_tenant in found.items():
            self.evidence[key] = by_tenant
            self._route(key, by_tenant)

    def adopt(self, found: dict[tuple[str, str], Evidence], epoch: int) -> None:
        """Replaces all the evidence with `found` (the shared store's after a reset, `epoch`)."""
        self.evidence.clear()
        self.posteriors.clear()
        self.team_posteriors.clear()
        self.set_evidence(found)
        self.epoch = epoch

    async def reset(self, scope: Scope) -> int:
        """Forgets the evidence in `scope` (here, and with sharing in every process and the
        store); returns how many (task, route, tenant) entries this process held of it."""
        held = sum(in_scope(scope, t, r, tenant) for (t, r), by in self.evidence.items() for tenant in by)
        if self.share is not None:
            await self.share.reset(scope)
        else:
            kept = {k: {t: e for t, e in by.items() if not in_scope(scope, *k, t)} for k, by in self.evidence.items()}
            self.adopt({k: by for k, by in kept.items() if by}, self.epoch + 1)
        await asyncio.to_thread(self.save)  # the state file too: a restart must not bring it back
        return held

    def _route(self, key: tuple[str, str], by_tenant: Evidence) -> None:
        """Recomputes the posteriors routing draws from for (task, route) `key`."""
        self.posteriors[key], by_team = routing(by_tenant, self.prior, self.tenants)
        if by_team:
            self.team_posteriors[key] = by_team
        else:
            self.team_posteriors.pop(key, None)

    def _draw(self, p: Posterior) -> float | None:
        """One Thompson draw as a bounded shift from the prior mean; None with no evidence that
        counts (no shift, not a draw from the prior)."""
        if p.alpha + p.beta <= sum(self.prior):
            return None
        prior_mean = self.prior[0] / (self.prior[0] + self.prior[1])
        draw = self.rng.betavariate(p.alpha, p.beta)
        return max(-self.max_shift, min(self.max_shift, draw - prior_mean))

    def shifts(self) -> dict[tuple[str, str], float]:
        """Every request's shifts: one draw per (task, route)."""
        return {key: d for key, p in self.posteriors.items() if (d := self._draw(p)) is not None}

    def team_shifts(self) -> dict[str, dict[tuple[str, str], float]]:
        """Per team, the shifts of the (task, route)s its ratings moved, for its requests alone
        (the core uses the global shift elsewhere)."""
        out: dict[str, dict[tuple[str, str], float]] = {}
        for key, by_team in self.team_posteriors.items():
            for team, p in by_team.items():
                if (d := self._draw(p)) is not None:
                    out.setdefault(team, {})[key] = d
        return out


LEARNER = web.AppKey("learner", FeedbackLearner)
REFRESH_SECONDS = 5.0


def _apply(app: web.Application, learner: FeedbackLearner) -> None:
    app[STATE].live.router.set_shifts(learner.shifts(), learner.team_shifts())


def _request_log(app: web.Application) -> Ledger | None:
    """The ledger, when it keeps the request log (feedback is then stored beside the records)."""
    rec = app.get(RECORDER)
    return rec if isinstance(rec, Ledger) and rec.request_log is not None else None


FIND_FOR_S = 5.0  # how long feedback waits for its request to reach the log (a busy writer)
# Feedback calls waiting on the log at once: past it, 503 at once (each waits up to FIND_FOR_S,
# reading the database every flush, so unbounded waits would turn a flood into database load).
MAX_LOOKUPS = 64
MAX_CALLERS = 10_000  # feedback buckets kept before the full ones are dropped
SHADOW_SUFFIX = "-shadow"  # a mirror's request id: `<primary id>-shadow` (`shadow._mirror`)


@dataclass(slots=True)
class FeedbackGate:
    """Per-caller rate limit and a bound on concurrent log lookups for `POST /v1/feedback`, and
    how its body is read: as every client endpoint's (`request_input.read_body`, from the API
    layer above this one): only the accepted content types, a repeated key refused. aiohttp's
    `read()` took a browser form's `text/plain`, which a page may post without a preflight."""

    limiter: LocalLimiter
    read_body: Callable[[web.Request], Awaitable[bytes]]
    lookups: int = 0

    def admit(self, request: web.Request) -> None:
        """Raises 429 over the caller's `learning.feedback_rpm`."""
        ident = request.get(IDENTITY)
        who = f"key:{ident.key}" if ident is not None else f"addr:{request.remote}"
        rpm = request.app[STATE].live.config.learning.feedback_rpm
        if len(self.limiter) >= MAX_CALLERS:  # callers by address (no keys): many sources, bounded memory
            self.limiter.forget_full()
        ok, states = self.limiter.take([Take(f"feedback:{who}", "requests", rpm, 1)])
        if not ok:
            wait = max(1, math.ceil(states[0].wait_s))
            raise ProxyError(
                429,
                f"Too many feedback calls: the limit is {rpm} a minute; retry in {wait} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )


FEEDBACK_GATE = web.AppKey("feedback_gate", FeedbackGate)


async def _logged(ledger: Ledger, rid: str) -> tuple[str | None, str, str | None, str | None] | None:
    """(key id, route, task, team) of a logged request. A request is queued for the log before its
    answer is sent, so one still queued is waited for (bounded); once the writer's queue has
    been seen empty and the row is still missing after a further flush, there is none."""
    # Not a mirror's row (`shadow.py`): the client never saw that answer.
    sql = "SELECT key_id, route, task, team FROM requests WHERE id = ? AND (outcome IS NULL OR outcome <> 'shadow')"
    deadline = asyncio.get_running_loop().time() + FIND_FOR_S
    drained = False
    while True:
        try:
            rows = await asyncio.to_thread(ledger.backend.query, sql, (rid,))
        except Exception as e:  # the database down or damaged: a clear 503, not a 500 and a traceback
            log.warning("feedback: the request log cannot be read (%s)", type(e).__name__)
            raise ProxyError(
                503, "The request log cannot be read now, so the request cannot be found; retry shortly.",
                code="request_log_unavailable", headers={"Retry-After": "5"},
            ) from None  # fmt: skip
        if rows:
            key, route, task, team = rows[0]
            return key, route, task, team
        if drained or asyncio.get_running_loop().time() > deadline:
            return None
        drained = ledger.queue_depth() == 0
        await asyncio.sleep(ledger.flush_interval + 0.05)


async def _lookup(
    gate: FeedbackGate, ledger: Ledger, rid: str
) -> tuple[str | None, str, str | None, str | None] | None:
    """`_logged`, within the bound on lookups waiting at once (503 past it)."""
    if gate.lookups >= MAX_LOOKUPS:
        raise ProxyError(
            503, "Too many feedback calls in progress; retry shortly.", code="overloaded", headers={"Retry-After": "1"}
        )
    gate.lookups += 1
    try:
        return await _logged(ledger, rid)
    finally:
        gate.lookups -= 1


def _owned(request: web.Request, key: str | None, team: str | None) -> bool:
    """Whether the caller may rate a request of `key` (in `team`): its own, or any an admin key
    over it may; a keyless caller (a sidecar) rates any."""
    ident = request.get(IDENTITY)
    return ident is None or key == ident.key or _may_rate_others(request, ident.role, team)


def _may_rate_others(request: web.Request, role: str | None, team: str | None) -> bool:
    """An admin key may rate another key's request: any, or its own team's when it is bound
    to one (`tenant_of`, as `/admin/requests` shows it only those)."""
    tenant = tenant_of(request)
    return roles.permits(role, "admin") and (tenant is None or tenant == team)


async def feedback_endpoint(request: web.Request) -> web.Response:
    """`POST /v1/feedback {"request_id": ..., "score": 0..1}`: how good an answer was.

    With the request log on, the score is stored beside the request's record (the last score
    given counts) for `router train --from-log` and the shadow report, for any request the
    caller's key made; the learner, when configured, learns from it for the routes it knows."""
    learner = request.app.get(LEARNER)
    ledger = _request_log(request.app)
    if learner is None and ledger is None:
        raise ProxyError(
            404, "Feedback is not enabled (set learning.feedback, or turn the request log on).", code="not_enabled"
        )
    gate = request.app[FEEDBACK_GATE]
    gate.admit(request)
    try:
        data = orjson.loads(await gate.read_body(request))
        rid, score = data["request_id"], data["score"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ProxyError(400, 'Expected {"request_id": "...", "score": 0..1}.', code="invalid_request") from None
    if isinstance(score, bool) or not isinstance(score, int | float):  # "1", true: a client's bug, not a score
        raise ProxyError(400, "score must be a number between 0 and 1.", param="score")
    score = float(score)
    if not isinstance(rid, str) or not 0.0 <= score <= 1.0:  # NaN fails the range test too
        raise ProxyError(400, "score must be between 0 and 1 and request_id a string.", param="score")
    if not rid or len(rid) > 256:
        raise ProxyError(400, "request_id must be 1 to 256 characters.", param="request_id")
    unknown = ProxyError(404, f"No recent routed request with id {rid!r}.", code="unknown_request_id")
    if rid.endswith(SHADOW_SUFFIX):
        raise unknown  # a mirror's answer: the client never saw it, so it has nothing to rate
    ident = request.get(IDENTITY)
    logged = await _lookup(gate, ledger, rid) if ledger is not None else None
    if logged is not None and not _owned(request, logged[0], logged[3]):
        raise unknown  # another key's (or team's) request: not even its existence is told
    if ledger is not None and logged is None and ident is not None:
        raise unknown  # with keys, only a request the log shows to be the caller's is rated
    served = None
    why_not: str | None = None
    if learner is not None:
        served = learner.known(rid)
        share = learner.share
        if served is None and share is not None and (served := await share.lookup(rid)) is not None:
            learner.remember_served(rid, served)  # served by another instance
        if served is not None and logged is None and not _owned(request, served.key, served.team):
            raise unknown  # the log off: the learner's record says whose it is, the same rule
        if served is not None:
            why_not = served.not_learned()
            claimed = False
            if why_not is None and share is not None:
                # The store marks it rated once, and only while it holds the request's record:
                # a score counts once fleet-wide, never again after the mark is lost.
                if (why_not := await share.claim(rid)) is not None:
                    served.rated = True
                claimed = why_not is None
            if why_not is None:
                learner.feedback(rid, score, claimed=claimed)
                _apply(request.app, learner)
    if served is None and logged is None:
        raise unknown
    if ledger is not None and logged is not None:
        ledger.outcome(outcomes.FEEDBACK, (rid, time.time(), score, ident.key if ident is not None else None))
    task: str | None
    if served is not None:
        route, task = served.route, served.task
    else:
        assert logged is not None
        route, task = logged[1], logged[2]
    stored = logged is not None
    body: dict[str, Any] = {"request_id": rid, "task": task, "route": route, "accepted": True, "stored": stored}
    if served is not None and served.cached:  # stored for the log (when on), never learned from
        body |= {"accepted": stored, "learned": False, "reason": NOT_LEARNED}
    elif why_not is not None:
        body |= {"learned": False, "reason": why_not}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def learning_state(request: web.Request) -> web.Response:
    """`GET /admin/learning`: the posteriors; a team-bound key's, its own team's and the operator's."""
    only_params(request, set())  # it takes none: `?team=a` answered every tenant's
    learner = request.app.get(LEARNER)
    body = learner.snapshot(team=tenant_of(request)) if learner is not None else {"enabled": False}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


_RESET_FIELDS = ("task", "route", "team", "tenant")


async def reset_endpoint(request: web.Request) -> web.Response:
    """`POST /admin/learning/reset {"task"?, "route"?, "team"? | "tenant"?}` (admin): forgets the
    learner's evidence (all of it, or that of one task class, route or tenant) in every instance
    and the shared store, which otherwise only grows; audited."""
    learner = request.app.get(LEARNER)
    if learner is None:
        raise ProxyError(404, "Feedback learning is not enabled (learning.feedback).", code="not_enabled")
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise ProxyError(400, "Expected a JSON object.", code="invalid_request") from None
    if not isinstance(data, dict) or set(data) - set(_RESET_FIELDS):
        raise ProxyError(400, f"Expected a JSON object of {', '.join(_RESET_FIELDS)} (each optional).")
    if any(not isinstance(v, str) or not v for v in data.values()) or {"team", "tenant"} <= set(data):
        raise ProxyError(
            400, "Each of task, route, team or tenant is a non-empty string; give team or tenant, not both."
        )
    tenant = tenant_id(data["team"]) if "team" in data else data.get("tenant")
    scope: Scope = (data.get("task"), data.get("route"), tenant)
    try:
        held = await learner.reset(scope)
    except StoreUnavailable:
        raise ProxyError(
            503, "The shared learning store cannot be reached: nothing was reset; retry shortly.",
            code="store_unavailable", headers={"Retry-After": "5"},
        ) from None  # fmt: skip
    _apply(request.app, learner)
    said = {"task": scope[0], "route": scope[1], "tenant": scope[2], "entries": held, "epoch": learner.epoch}
    if (gov := request.app.get(GOV)) is not None:
        await gov.audit(actor_of(request), "learning.reset", "learning", None, said)
    return web.Response(body=orjson.dumps({"reset": True} | said), content_type="application/json")


def install(
    app: web.Application,
    config: Config,
    base_dir: Path | None,
    read_body: Callable[[web.Request], Awaitable[bytes]],
) -> None:
    """Adds the feedback endpoints, and the learner when `learning.feedback` is configured."""
    app[FEEDBACK_GATE] = FeedbackGate(LocalLimiter(), read_body)
    app.router.add_post("/v1/feedback", feedback_endpoint)
    app.router.add_get("/admin/learning", learning_state)
    app.router.add_post("/admin/learning/reset", reset_endpoint)
    fb = config.learning.feedback
    if fb is None:
        return
    path = Path(fb.state_path) if fb.state_path else None
    if path is not None and base_dir is not None and not path.is_absolute():
        path = base_dir / path
    learner = FeedbackLearner(path, max_shift=fb.max_shift, cost_weight=fb.cost_weight, tenants=fb.tenants)
    app[LEARNER] = learner

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        _apply(app, learner)

        async def refresh() -> None:
            while True:
                await asyncio.sleep(REFRESH_SECONDS)
                _apply(app, learner)
                try:
                    await asyncio.to_thread(learner.save)
                except OSError as e:  # a full disk must not stop the learner steering routing
                    log.warning("learning state: cannot write %s (%s)", learner.state_path, e)

        task = asyncio.create_task(refresh())
        yield
        await background.stop(task)
        await asyncio.to_thread(learner.save)

    app.cleanup_ctx.append(ctx)
