"""Token-bucket rate limits at admission: the key's (and the keys that made it), the model's,
and the provider limit of the decision's first deployment; the `x-ratelimit-*` headers and
the 429 that name the bucket."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from aiohttp import web

from edgeroute import _core
from edgeroute.accounting import RequestRecord
from edgeroute.config import Config, Limit
from edgeroute.cost.control.stores import Stores
from edgeroute.cost.control.ticket import CostTicket, Held, Taken
from edgeroute.cost.keys import Identity
from edgeroute.cost.limits import BucketState, Take, headers_for, held_takes, unbounded_take
from edgeroute.errors import ProxyError

RATE_STATES = web.RequestKey("rate_states", list)


def bucket_takes(name: str, lim: Limit, tokens: int, more: int = 0, answers: int = 1) -> list[Take]:
    """`lim`'s buckets' demand: a request, and `tokens` (and up to `more` beyond for `answers`
    answers of no bound: `limits.unbounded_take`)."""
    takes = [Take(name, "requests", lim.rpm, 1)] if lim.rpm else []
    if lim.tpm:
        takes.append(
            unbounded_take(name, lim.tpm, tokens, more, answers) if more else Take(name, "tokens", lim.tpm, tokens)
        )
    return takes


class ProviderGate:
    """One request's provider limits as its attempts go out (`Admission.attempt_gate`)."""

    __slots__ = ("_control", "_limits", "_ticket")

    def __init__(self, control: RateLimits, limits: dict[str, Limit], ticket: CostTicket) -> None:
        self._control, self._limits, self._ticket = control, limits, ticket

    async def take(self, name: str) -> bool:
        """Takes `name`'s provider limit for one more attempt (False: at its limit), added to
        what the request holds on that deployment already, so that settlement counts its
        tokens once."""
        lim = self._limits.get(name)
        if lim is None:
            return True
        ticket = self._ticket
        takes = bucket_takes(f"deployment:{name}", lim, ticket.tokens, ticket.more, ticket.answers)
        ok, states, shared = await self._control._take(takes)
        if not ok:
            return False
        takes = held_takes(takes, states)
        held = next((h for h in ticket.held if h.deployment == name and h.shared == shared), None)
        if held is None:
            ticket.held.append(Held(takes, shared, name))
        else:  # the same buckets: one take of the sum
            pairs = zip(held.takes, takes, strict=True)
            held.takes = [dataclasses.replace(t, amount=t.amount + n.amount, hold=t.hold + n.hold) for t, n in pairs]
        return True

    def give_back(self, name: str) -> None:
        """`name`, admission's first choice, cannot read the request: what the request holds on
        it goes back now (it held the deployment's last request a minute until the request
        ended, turning others away from it), and no longer at settlement (given back twice,
        its provider would be sent more than its limit)."""
        ticket = self._ticket
        for h in [h for h in ticket.held if h.deployment == name]:
            ticket.held.remove(h)
            self._control._give(h.takes, [-t.amount for t in h.takes], h.shared)
            h.give_back_hold()


class RateLimits(Stores):
    """Key, model and deployment limits (a part of `CostControl`)."""

    cfg: Config
    _model_limits: dict[str, Limit]

    def _key_limit(self, ident: Identity) -> Limit | None:
        """The key's requests and tokens per minute: its own `limits` when they set either, else
        `rate_limits.per_key`'s. A key's `max_parallel` alone does not take it out of them: it
        did, so `keys create --max-parallel 5` lifted a key out of the fleet's RPM and TPM caps."""
        own = ident.limits
        if own is not None and (own.rpm is not None or own.tpm is not None):
            return own
        return self.cfg.rate_limits.per_key

    def _key_parallel(self, ident: Identity) -> int | None:
        """The key's cap on requests in flight: its own, else `rate_limits.per_key`'s."""
        own = ident.limits.max_parallel if ident.limits is not None else None
        per_key = self.cfg.rate_limits.per_key
        return own if own is not None else (per_key.max_parallel if per_key is not None else None)

    def _key_takes(self, ident: Identity, tokens: int, more: int = 0, answers: int = 1) -> list[Take]:
        key_limit = self._key_limit(ident)
        takes = bucket_takes(f"key:{ident.key}", key_limit, tokens, more, answers) if key_limit else []
        for ancestor, lim in ident.ancestor_limits:  # the keys that made it share their limits
            takes += bucket_takes(f"key:{ancestor}", lim, tokens, more, answers)
        return takes

    def _rate_takes(self, ident: Identity, route: str, tokens: int, more: int = 0, answers: int = 1) -> list[Take]:
        model_limit = self._model_limits.get(route)
        takes = self._key_takes(ident, tokens, more, answers)
        if model_limit is not None:
            takes += bucket_takes(f"model:{route}", model_limit, tokens, more, answers)
        return takes

    async def _rate_limits(
        self,
        request: web.Request,
        route: str,
        tokens: int,
        rec: RequestRecord,
        ticket: CostTicket,
        got: Taken | None = None,
    ) -> None:
        """Takes the key and model limits (or reads `got`, their result taken already)."""
        takes = self._rate_takes(ticket.identity, route, tokens, ticket.more, ticket.answers)
        if not takes:
            return
        ok, states, shared = got if got is not None else await self._take(takes)
        request[RATE_STATES] = _visible(states, ticket.identity)  # headers are made when the answer goes out
        if not ok:
            rec.outcome = "rate_limited"
            raise _rate_limit_error(states, headers_for(states))
        ticket.held.append(Held(held_takes(takes, states), shared))

    async def _request_limits(self, request: web.Request, ident: Identity) -> None:
        """Takes one request from the key's requests-per-minute limits (and those of the keys
        that made it) for a request that reaches no upstream; its 429 is a chat request's."""
        takes = [t for t in self._key_takes(ident, 0) if t.kind == "requests"]
        if not takes:
            return
        ok, states, _ = await self._take(takes)
        request[RATE_STATES] = _visible(states, ident)
        if not ok:
            raise _rate_limit_error(states, headers_for(states))

    async def _follow_downgrade(
        self, request: web.Request, rec: RequestRecord, ticket: CostTicket, old: str, new: str, tokens: int
    ) -> None:
        """A downgraded request counts against the target model's limits: the original model
        and its deployment will not serve it, so their takes go back."""
        gone = f"model:{old}"
        tasks = []
        for h in ticket.held:
            back = h.takes if h.deployment is not None else [t for t in h.takes if t.name == gone]
            tasks.append(self._give(back, [-t.amount for t in back], h.shared))
            if h.deployment is not None:
                h.give_back_hold()
            h.takes = [t for t in h.takes if t not in back]
        ticket.held = [h for h in ticket.held if h.takes]
        await self._wait(tasks)
        states = [s for s in request.get(RATE_STATES, []) if s.name != gone]
        request[RATE_STATES] = states
        lim = self._model_limits.get(new)
        takes = bucket_takes(f"model:{new}", lim, tokens, ticket.more, ticket.answers) if lim is not None else []
        if not takes:
            return
        ok, taken, shared = await self._take(takes)
        states += taken
        if not ok:
            rec.outcome = "rate_limited"
            raise _rate_limit_error(states, headers_for(states))
        ticket.held.append(Held(held_takes(takes, taken), shared))

    async def _deployment_limits(
        self,
        router: _core.Router,
        table: list[Any],
        decision: _core.Decision,
        tokens: int,
        ticket: CostTicket,
        again: bool = True,
        got: Taken | None = None,
    ) -> None:
        """Takes the provider limit of the decision's first deployment (or reads `got`, taken
        already); at its limit, asks the endpoint to decide again (`again`) when the model has
        other deployments, else refuses."""
        found = self._deployment_of(table, decision)
        if found is None:
            return
        name, lim = found
        dep = table[decision.order[0]]
        takes = bucket_takes(f"deployment:{name}", lim, tokens, ticket.more, ticket.answers)
        ok, states, shared = got if got is not None else await self._take(takes)
        # The core has no limit-aware selection: hold the deployment out of it until a request's
        # worth is back, so that selection routes around it. A hold, not a `rate_limited` report:
        # the provider was sent nothing, so its health shows no failure, and no upstream 429's
        # cool-down is shortened when a give-back ends the hold. Not shared with other instances:
        # each learns a shared bucket's state by its own take.
        if not ok:
            wait = max(s.wait_s for s in states)
        else:
            drained = [s for s in states if s.kind == "requests" and s.remaining < 1]
            wait = 60 / drained[0].limit if drained else 0.0
        if wait > 0:
            router.hold_for_limit(dep.index, math.ceil(min(wait, 60.0) * 1000))
        if ok:
            end = functools.partial(router.end_limit_hold, dep.index) if wait > 0 else None
            ticket.held.append(Held(held_takes(takes, states), shared, name, end))
            return
        if again and len(decision.order) > 1:
            ticket.reroute = decision.model
            return
        raise ProxyError(
            429,
            f"The only deployment for model '{decision.model}' is at its provider's rate limit; "
            f"try again in {min(wait, 60.0):.2f}s.",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(min(wait, 60.0))))},
        )

    def attempt_gate(self, ticket: Any) -> ProviderGate | None:
        """Admission took the provider limit of the decision's first deployment for its first
        attempt; each other attempt (a retry, a fallback, a hedge) takes its deployment's here,
        before it is sent. A failover or a hedge to a deployment at its limit went out
        uncounted: every request to it beyond its RPM."""
        limits = self.cfg.rate_limits.deployments
        if not limits or not isinstance(ticket, CostTicket):
            return None
        return ProviderGate(self, limits, ticket)

    def _deployment_of(self, table: list[Any], decision: _core.Decision) -> tuple[str, Limit] | None:
        """The decision's first deployment and its provider limit, when it has one."""
        limits = self.cfg.rate_limits.deployments
        if not limits:
            return None
        name: str = table[decision.order[0]].name
        lim = limits.get(name)
        return None if lim is None else (name, lim)


def _visible(states: list[BucketState], ident: Identity) -> list[BucketState]:
    """The buckets an answer's `x-ratelimit-*` may show its caller: a team's key sees its own
    (and those of the keys that made it), not a model's that every team takes from, whose
    remaining count is other teams' traffic (`/admin/budgets` shows such a bucket to a team key
    as `shared`, without its figures). Its 429 still names the bucket that refused it."""
    if ident.team is None:
        return states
    return [s for s in states if s.name.startswith("key:")]


def _rate_limit_error(states: list[BucketState], hdrs: dict[str, str]) -> ProxyError:
    worst = max((s for s in states if s.wait_s > 0), key=lambda s: s.wait_s)
    what = "requests" if worst.kind == "requests" else "tokens"
    scope, _, name = worst.name.partition(":")
    if math.isinf(worst.wait_s):
        msg = f"Request too large for {scope} '{name}': the {what} per minute limit is {worst.limit}."
        retry = "60"
    else:
        msg = (
            f"Rate limit reached for {what} per minute on {scope} '{name}': limit {worst.limit}. "
            f"Please try again in {worst.wait_s:.2f}s."
        )
        retry = str(max(1, math.ceil(worst.wait_s)))
    return ProxyError(429, msg, code="rate_limit_exceeded", headers={**hdrs, "Retry-After": retry})


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Adds the `x-ratelimit-*` headers computed at admission to the answer."""
    states = request.get(RATE_STATES)
    if states:
        for k, v in headers_for(states).items():
            response.headers.setdefault(k, v)
