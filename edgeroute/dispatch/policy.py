"""The failover policy: after each attempt, what the request does next.

The loop in `failover` is the mechanism: it makes attempts and asks. This module is
the policy (tower's `retry::Policy` is the model): given what has happened so far it
answers `Try(deployment, wait)` or `Stop(status, reason)`. It owns everything the
loop must not decide by itself:

- the plan: the decision's order, plus the deployments of `fallbacks_on` models for
  the outcome that just happened, restricted to what the decision's rule allows
  (its deployments, required and excluded tags: residency holds on fallbacks too);
- pruning: after a context-window overflow, no deployment as small is tried;
- a deployment ejected for this request's sender alone (its own failures tripped it) is
  left out of the plan before any attempt is counted, as an open circuit is; with nothing
  else in the order, the `fallbacks_on` models of a failure that ejects take its place, and
  without those it is kept;
- budgets: at most `max_attempts`; a deployment not yet called whose circuit is not
  open is tried freely, and only going back to one (or to an ejected one) takes from
  the shared retry budget, so the budget damps retry storms without ever refusing
  a healthy second choice;
- backoff between rounds (full jitter, or the upstream's `Retry-After`);
- poison requests: the same server error from two deployments that are serving
  other requests is the request's fault: stop, and it does not count against them;
- requests with side effects upstream (`side_effects`): once an upstream may have run
  one, stop: no other deployment runs it again;
- hedges: only to the route's own deployments (a fallback model is for failures);
- the final status and error the client gets.

No I/O and no clock of its own: health, the retry budget, the time left and the
deployments' recent successes are given as callables, so tests drive it directly.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeroute import redact
from edgeroute.dispatch import side_effects
from edgeroute.dispatch.attempt import Failure
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome, fallback_keys
from edgeroute.upstream import DeploymentInfo

_VOLATILE = re.compile(r"[0-9a-f]{8,}(?:-[0-9a-f]{4,})*|\d+")  # ids, counters, timestamps in messages


_RNG = random.Random()

# Failures that count against a deployment's health, and so may eject it for one sender.
_EJECTING = (Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECT_ERROR, Outcome.AUTH_ERROR)


@dataclass(frozen=True, slots=True)
class Try:
    """Call `deployment` after `wait` seconds."""

    deployment: DeploymentInfo
    wait: float = 0.0
    kind: str = "first"  # first | retry (the route's own deployments) | fallback (another model's)


@dataclass(frozen=True, slots=True)
class Stop:
    """Answer the client with this error; no further attempt."""

    status: int
    reason: str
    code: str
    error_class: str  # an Outcome value, "poison", or a refusal's code
    headers: dict[str, str] = field(default_factory=dict)
    details: list[dict[str, Any]] | None = None
    # No deployment could read the request: the first one's refusal, as it said it (its param).
    refusal: ProxyError | None = None
    # The failures were the request's own (a client error the deployments sent inside a 200):
    # none is charged to a deployment's health, as a poison request's are not.
    the_requests: bool = False

    @property
    def poison(self) -> bool:
        return self.error_class == "poison"

    @property
    def request_fault(self) -> bool:
        """Whether the held health reports are the request's fault, not the deployments'."""
        return self.poison or self.the_requests

    param: str | None = None  # the request field at fault, as the provider named it (OpenAI's `param`)

    def error(self) -> ProxyError:
        if self.refusal is not None:
            return self.refusal
        return ProxyError(
            self.status, self.reason, code=self.code, param=self.param, headers=dict(self.headers), details=self.details
        )


@dataclass(slots=True)
class FailoverState:
    """One request's progress; changed only by the policy."""

    plan: list[DeploymentInfo]  # what to try, in order (the policy inserts fallbacks and prunes)
    pos: int = 0  # the next entry of `plan`
    rounds: int = 0  # times the whole plan was gone through
    attempts: int = 0  # attempts started, hedges included
    failures: list[tuple[DeploymentInfo, Failure]] = field(default_factory=list)
    called: list[DeploymentInfo] = field(default_factory=list)  # deployments actually sent the request
    budget_refused: bool = False
    spilled: list[DeploymentInfo] = field(default_factory=list)  # skipped because at capacity
    capacity_fallbacks: bool = False  # `fallbacks_on: capacity` added already
    # Out of the plan for good: they cannot read this request (never sent it), with why.
    unreadable: list[tuple[DeploymentInfo, ProxyError]] = field(default_factory=list)
    # Left out of the plan: ejected for this request's sender alone (never sent it).
    sender_skipped: list[DeploymentInfo] = field(default_factory=list)

    def excluded(self, dep: DeploymentInfo) -> bool:
        """Whether `dep` is planned already or cannot read the request (no fallback adds it)."""
        return dep in self.plan or any(d == dep for d, _ in self.unreadable)


@dataclass(slots=True)
class Settings:
    max_attempts: int
    backoff_base_ms: float
    backoff_max_ms: float
    max_retry_after_s: float
    # The longest a 429 cools a deployment down (`health.max_ejection_ms`): the longest wait a
    # 429 of ours may promise, whatever the upstream's `Retry-After` said (a year, a far date).
    max_cool_down_s: float = math.inf


class FailoverPolicy:
    """Answers the loop's questions for one request (see the module docstring)."""

    __slots__ = (
        "_allowed", "_fallbacks_on", "_is_full", "_is_open", "_once", "_remaining", "_rng", "_sender_ejected",
        "_serving", "_try_retry", "model", "own", "settings",
    )  # fmt: skip

    def __init__(
        self,
        model: str,
        own: Sequence[str],
        settings: Settings,
        *,
        fallbacks_on: Callable[[str], Sequence[DeploymentInfo] | None],
        allowed: Callable[[DeploymentInfo], bool],
        is_open: Callable[[int], bool],
        try_retry: Callable[[], bool],
        remaining: Callable[[], float],
        serving: Callable[[int], bool],
        is_full: Callable[[int], bool] | None = None,
        rng: random.Random | None = None,
        sender_ejected: Callable[[int], bool] | None = None,
        once: Callable[[], str | None] | None = None,
    ) -> None:
        self.model = model  # as the client named it, for messages
        self.own = own  # the route's own deployment names (attempts on others are fallbacks)
        self.settings = settings
        self._fallbacks_on = fallbacks_on  # a `fallbacks_on` key -> its models' deployments
        self._allowed = allowed  # what the decision's rule permits
        self._is_open = is_open
        self._try_retry = try_retry
        self._remaining = remaining
        self._serving = serving  # whether a deployment answered other requests lately
        self._is_full = is_full or _never  # whether a deployment is at its max_concurrency
        self._rng = rng or _RNG  # one per process: seeding a new one costs ~50 µs
        self._sender_ejected = sender_ejected  # whether a deployment is ejected for this sender alone
        # The request's side effect upstream (None: none), asked only once an upstream may have run it.
        self._once = once

    def start(self, order: Sequence[DeploymentInfo]) -> FailoverState:
        """The plan: `order` without the deployments ejected for this request's sender alone
        (skipped before any attempt is counted, as open circuits are). When that leaves none, the
        `fallbacks_on` models a failure that ejects would add (so its requests stop reaching the
        deployment on a route whose fallback is only there); `order` as it is without them."""
        ejected = self._sender_ejected
        if ejected is not None:
            kept = [d for d in order if not ejected(d.index)]
            if len(kept) < len(order):
                skipped = [d for d in order if d not in kept]
                state = FailoverState(plan=[], sender_skipped=skipped)
                state.plan = kept or self._ejection_fallbacks(state, skipped[0])
                if state.plan:
                    return state
        return FailoverState(plan=list(order))

    def _ejection_fallbacks(self, state: FailoverState, ejected: DeploymentInfo) -> list[DeploymentInfo]:
        """The `fallbacks_on` deployments for the outcomes whose failures eject a deployment for a
        sender, in that order, each once."""
        out: list[DeploymentInfo] = []
        for outcome in _EJECTING:
            out += [d for d in self._outcome_fallbacks(state, ejected, outcome) if d not in out]
        return out

    def _open(self, index: int) -> bool:
        """Whether deployment `index`'s circuit is open, or it is ejected for this sender alone."""
        return self._is_open(index) or (self._sender_ejected is not None and self._sender_ejected(index))

    def next_attempt(self, state: FailoverState, failed: tuple[DeploymentInfo, Failure] | None) -> Try | Stop:
        """The next step after `failed` (None before the first attempt)."""
        if failed is not None:
            stop = self._learn(state, *failed)
            if stop is not None:
                return stop
        return self._choose(state)

    def note(self, state: FailoverState, dep: DeploymentInfo, failure: Failure) -> None:
        """Records a failure the loop will not ask about (a hedge race's first loser)."""
        state.failures.append((dep, failure))
        if failure.sent and dep not in state.called:
            state.called.append(dep)

    def hedge_target(self, state: FailoverState) -> DeploymentInfo | None:
        """Where a hedge for the first attempt would go, if one may be sent: the next of the
        route's own deployments, never a fallback model's (another model's answer, at its price,
        for a request that has not failed)."""
        if state.pos < len(state.plan) and state.attempts < self.settings.max_attempts:
            dep = state.plan[state.pos]
            if dep.name not in self.own or self._is_full(dep.index):  # no hedge into a full deployment
                return None
            return dep
        return None

    def hedged(self, state: FailoverState) -> None:
        """The hedge to `hedge_target` was sent."""
        state.pos += 1
        state.attempts += 1

    # -- after a failure ---------------------------------------------------------------

    def _learn(self, state: FailoverState, dep: DeploymentInfo, f: Failure) -> Stop | None:
        self.note(state, dep, f)
        if not f.sent:
            return None  # the deployment cannot take this request (e.g. a parameter): skip it
        if self._once is not None and side_effects.may_have_run(f) and (what := self._once()) is not None:
            # The request's own error (a client error inside a 200) as it is, else why no retry.
            if not f.outcome.retryable or f.in_band:
                return self._client_error(f)
            return self._not_again(state, dep, f, what)
        if self._is_poison(state, dep, f):
            return self._poison(state, f)
        extra = self._outcome_fallbacks(state, dep, f.outcome)
        plan, pos = state.plan, state.pos
        if f.outcome is Outcome.CONTEXT_WINDOW and dep.context_window:
            # Deployments no larger than the one that overflowed would overflow too.
            plan[pos:] = [d for d in plan[pos:] if not 0 < d.context_window <= dep.context_window]
        plan[pos:pos] = extra
        overflow_only = f.outcome is Outcome.CONTEXT_WINDOW and pos >= len(plan)
        if (not f.outcome.retryable or overflow_only) and not extra:
            return self._client_error(f)
        return None

    def _outcome_fallbacks(
        self, state: FailoverState, failed: DeploymentInfo, outcome: Outcome
    ) -> list[DeploymentInfo]:
        """Deployments of the models `fallbacks_on` names for this outcome, that the rule allows."""
        for key in fallback_keys(outcome):
            deps = self._fallbacks_on(key)
            if deps is None:
                continue
            out: list[DeploymentInfo] = []
            for d in deps:
                if state.excluded(d) or d in out or self._open(d.index) or not self._allowed(d):
                    continue
                if outcome is Outcome.CONTEXT_WINDOW and 0 < d.context_window <= failed.context_window:
                    continue
                out.append(d)
            return out
        return []

    def _is_poison(self, state: FailoverState, dep: DeploymentInfo, f: Failure) -> bool:
        if not f.maybe_the_requests:
            return False
        sig = signature(f)
        return any(
            d != dep and prev.maybe_the_requests and signature(prev) == sig for d, prev in state.failures[:-1]
        ) and all(self._serving(d.index) for d in [dep, *(d for d, p in state.failures[:-1] if p.sent)])

    def _poison(self, state: FailoverState, f: Failure) -> Stop:
        if f.in_band:  # two deployments called it the request's fault in a 200: the client's 4xx
            return self._in_band_error(f)
        names = ", ".join(d.name for d in state.called)
        return Stop(
            502,
            f"The request failed with the same upstream error on {len(state.called)} deployments ({names}): "
            + redact.cut(f"HTTP {f.status}: {f.message}", 800)
            + " It was not retried further: the request itself appears to cause the error.",
            "upstream_request_failed",
            "poison",
            details=self._details(state),
        )

    def _not_again(self, state: FailoverState, dep: DeploymentInfo, f: Failure, what: str) -> Stop:
        """The request's upstream may have run it, and it has side effects: not sent elsewhere."""
        status, code = (504, "upstream_timeout") if f.outcome is Outcome.TIMEOUT else (502, "upstream_failed")
        said = f"HTTP {f.status}: {f.message}" if f.status is not None else f.message
        return Stop(
            status,
            f"Deployment {dep.name} failed for model '{self.model}' after the request reached it ("
            + redact.cut(said, 800)
            + "). "
            + side_effects.why_not_again(what),
            code,
            f.outcome.value,
            details=self._details(state),
        )

    # -- choosing the next attempt -------------------------------------------------------

    def _choose(self, state: FailoverState) -> Try | Stop:
        wait = 0.0
        skipped = 0  # full deployments passed over since the last choice
        while True:
            if state.attempts >= self.settings.max_attempts or self._remaining() <= 0.001:
                return self._exhausted(state)
            if state.pos >= len(state.plan):
                if state.attempts == 0 and state.spilled:
                    # Everything in the plan is full: spill to `fallbacks_on: capacity`, once, else stop.
                    if not state.capacity_fallbacks and self._add_capacity_fallbacks(state):
                        continue
                    return self._at_capacity(state)
                if not state.plan or state.budget_refused or skipped >= len(state.plan):
                    return self._exhausted(state)
                # Every deployment failed once: back off and go round again, but not to one that
                # refused edgeroute's credentials (the same key would be refused again), nor one
                # whose failure would come again, paid (`Failure.again`).
                refused = {d.name for d, f in state.failures if f.outcome is Outcome.AUTH_ERROR or not f.again}
                if refused:
                    state.plan = [d for d in state.plan if d.name not in refused]
                    if not state.plan:
                        return self._exhausted(state)
                state.rounds += 1
                backoff = self._backoff(state)
                if backoff is None or backoff >= self._remaining():
                    return self._exhausted(state)
                wait = backoff
                state.pos = 0
            dep = state.plan[state.pos]
            if self._is_full(dep.index):
                # Busy, not failing: pass it over without touching its health.
                if dep not in state.spilled:
                    state.spilled.append(dep)
                state.pos += 1
                skipped += 1
                continue
            # `fresh` matters from the second attempt only: the first asks no circuit (a dict
            # of nine fields from the core, on every request).
            fresh = state.attempts == 0 or (dep not in state.called and not self._open(dep.index))
            if not fresh and not self._try_retry():
                state.budget_refused = True
                if state.rounds > 0:
                    return self._exhausted(state)
                state.pos += 1  # a deployment not yet called may still follow: the budget never stops that
                continue
            state.pos += 1
            state.attempts += 1
            if state.attempts == 1:
                kind = "first"
            else:
                kind = "retry" if dep.name in self.own else "fallback"
            return Try(dep, wait, kind)

    def _add_capacity_fallbacks(self, state: FailoverState) -> bool:
        state.capacity_fallbacks = True
        extra = [
            d
            for d in self._fallbacks_on("capacity") or ()
            if not state.excluded(d) and not self._open(d.index) and self._allowed(d)
        ]
        state.plan.extend(extra)
        return bool(extra)

    def _at_capacity(self, state: FailoverState) -> Stop:
        names = ", ".join(d.name for d in state.spilled)
        return Stop(
            429,
            f"All deployments for model '{self.model}' are at capacity ({names}); retry shortly.",
            "capacity_exhausted",
            "capacity",
            {"Retry-After": "1"},
        )

    def passed_over(self, state: FailoverState, dep: DeploymentInfo) -> Try | Stop:
        """`dep` was chosen but had no room after all (shared capacity: other processes filled
        it): passed over as full, not counted as an attempt; the next choice."""
        state.attempts -= 1
        if dep not in state.spilled:
            state.spilled.append(dep)
        return self._choose(state)

    def cannot_read(self, state: FailoverState, dep: DeploymentInfo, why: ProxyError, chosen: bool) -> None:
        """`dep` cannot read this request (building its request was refused: a document only
        Anthropic reads on a chat deployment, a parameter its provider rejects): out of the plan
        for good, before any call. Not an attempt (`chosen`: the one just chosen is taken back),
        not a failure: no retry budget, no health report."""
        i = state.plan.index(dep)
        del state.plan[i]
        if i < state.pos:
            state.pos -= 1
        if chosen:
            state.attempts -= 1
        if dep in state.spilled:  # passed over as full first: no wait for its room helps
            state.spilled.remove(dep)
        state.unreadable.append((dep, why))

    def redraw_first(self, state: FailoverState, weight: Callable[[DeploymentInfo], int]) -> None:
        """The first choice could not read the request: the next one drawn by weight among the
        route's own deployments that lead the plan (with room, circuit not open), as the weighted
        strategy draws its first. The core orders the rest by weight: taking the next in that
        order gave the heaviest all of the skipped one's share."""
        lead: list[DeploymentInfo] = []
        for d in state.plan[state.pos :]:
            if d.name not in self.own:
                break
            if not self._is_full(d.index) and not self._open(d.index):
                lead.append(d)
        if len(lead) > 1:
            pick = self._rng.choices(lead, [max(1, weight(d)) for d in lead])[0]
            state.plan.remove(pick)
            state.plan.insert(state.pos, pick)

    def restart(self, state: FailoverState) -> None:
        """After a wait for capacity: go through the plan again from the start."""
        state.pos = 0
        state.spilled.clear()

    def _backoff(self, state: FailoverState) -> float | None:
        s = self.settings
        recent = state.failures[-len(state.plan) :]
        waits = [f.retry_after_s for _, f in recent if f.retry_after_s is not None]
        if waits:
            wait = min(waits)
            return None if wait > s.max_retry_after_s else wait
        cap = min(s.backoff_max_ms, s.backoff_base_ms * (2**state.rounds)) / 1000
        return self._rng.uniform(0, cap)

    # -- the final answer --------------------------------------------------------------

    def _in_band_error(self, f: Failure) -> Stop:
        """The client error deployments sent inside a 200, as its 4xx; its failures are the
        request's (no deployment's health is charged), a client error, not a poison request (no
        upstream failed: no poison alert nor warning)."""
        stop = self._client_error(f)
        return Stop(stop.status, stop.reason, stop.code, Outcome.CLIENT_ERROR.value, the_requests=True)

    def _client_error(self, f: Failure) -> Stop:
        status, code, param = client_error_code(f)
        return Stop(status, f.message, code, f.outcome.value, param=param)

    def _details(self, state: FailoverState) -> list[dict[str, Any]]:
        return [
            {"deployment": d.name, "status": f.status, "error": f.outcome.value, "message": f.message}
            for d, f in state.failures
        ] + [
            {"deployment": d.name, "status": e.status, "error": "cannot_read", "message": e.message}
            for d, e in state.unreadable
        ]

    def _exhausted(self, state: FailoverState) -> Stop:
        if not state.failures and state.unreadable and not state.spilled:
            # No deployment could read it: the first one's refusal, naming what it cannot read.
            e = state.unreadable[0][1]
            return Stop(e.status, e.message, e.code or e.type, e.code or e.type, refusal=e)
        sent = [f for _, f in state.failures if f.sent]
        if sent and all(f.in_band for f in sent):  # no deployment left to ask: the client's 4xx
            return self._in_band_error(sent[-1])
        outcomes = {f.outcome for f in sent}
        if outcomes and outcomes <= {Outcome.TIMEOUT}:
            status, code = 504, "upstream_timeout"
        elif outcomes and outcomes <= {Outcome.RATE_LIMITED}:
            status, code = 429, "upstream_rate_limited"
        elif not outcomes:
            status, code = 503, "no_deployment_available"
        else:
            status, code = 502, "upstream_failed"
        tried = ", ".join(sorted({d.name for d in state.called})) or "none"
        why = "; the retry budget is exhausted" if state.budget_refused else ""
        waits = [f.retry_after_s for f in sent if f.retry_after_s is not None]
        hdrs = {}
        if waits and status == 429:
            wait = min(*waits, self.settings.max_cool_down_s)
            hdrs["Retry-After"] = str(max(1, int(wait + 0.999)))
        return Stop(
            status,
            f"All deployments for model '{self.model}' failed (tried: {tried}{why}).",
            code,
            state.failures[-1][1].outcome.value if state.failures else "no_deployment",
            hdrs,
            self._details(state),
        )


def client_error_code(f: Failure) -> tuple[int, str, str | None]:
    """The status, code and param a client gets for an upstream's client error: the code OpenAI
    gives it where clients and SDKs branch on one (a prompt too long for the model, whatever its
    provider called it: `context_length_exceeded`, a 400 on `messages`; a content filter's
    refusal: Azure's `content_filter`, else `content_policy_violation`), else
    `upstream_client_error` (`model_not_found` for a 404)."""
    if f.outcome is Outcome.CONTEXT_WINDOW:
        return 400, "context_length_exceeded", "messages"
    status = f.status or 400
    if f.outcome is Outcome.CONTENT_POLICY:
        return (
            status,
            "content_filter" if b"content_filter" in f.body[:2048].lower() else "content_policy_violation",
            None,
        )
    return status, "upstream_client_error" if status != 404 else "model_not_found", None


def _never(index: int) -> bool:
    return False


def signature(f: Failure) -> tuple[int | None, str]:
    """What makes two failures "the same error": the status and the message without its ids and numbers."""
    return f.status, _VOLATILE.sub("#", f.message.lower())
