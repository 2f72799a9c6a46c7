"""Budget admission by reservation: the request's maximum cost (at the highest price among the
deployments it may use) is reserved in every budget it falls under; a `downgrade` threshold
reroutes it to a cheaper model, a `block` threshold refuses it with 429."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgeroute import _core
from edgeroute.accounting import RequestRecord
from edgeroute.config import Budget, Config
from edgeroute.cost import budgets as B
from edgeroute.cost.control.notify import Notifications, iso
from edgeroute.cost.control.read_back import ReadBack
from edgeroute.cost.control.settlement import Settlement
from edgeroute.cost.control.ticket import AtOnce, CostTicket
from edgeroute.cost.keys import Identity
from edgeroute.cost.media import rule_of
from edgeroute.cost.prices import Ceiling, ceiling, may_hedge, reachable_models, route_ceilings, unbounded_output
from edgeroute.errors import ProxyError


@dataclass(slots=True)
class Prices:
    """Reservation ceilings for one config generation: a reload changes prices, and the
    deployment table that decisions' indices point into."""

    config: Config
    routes: dict[str, Ceiling]
    tops: dict[tuple[str | int, ...], Ceiling] = field(default_factory=dict)
    windows: dict[str, int | None] = field(default_factory=dict)  # `largest_window`, per model

    def top(self, route: str, order: list[int], table: list[Any]) -> Ceiling:
        """The ceiling over the deployments a request may reach: its decision's order, and
        those of the models its route's `fallbacks_on` adds when an attempt fails (often the
        dearer ones: a reservation at the order's prices alone let a budget be overshot)."""
        key: tuple[str | int, ...] = (route, *order)
        hit = self.tops.get(key)
        if hit is None:
            if len(self.tops) > 4096:
                self.tops.clear()  # orders are few in practice: never grow without bound
            cfg = self.config
            deployments = [table[i].name for i in order]
            if (model := cfg.models.get(route)) is not None:
                names = [n for ns in model.fallbacks_on.values() for n in ns if n in cfg.models]
                deployments += [d for n in names for d in cfg.models[n].deployments]
            prices = [table[i].price for i in order]
            prices += [cfg.deployments[d].price for d in deployments[len(order) :]]
            media = rule_of(cfg.deployments[d] for d in deployments if d in cfg.deployments)
            hit = self.tops[key] = ceiling(prices, unbounded_output(cfg, deployments), media)
        return hit

    def largest_window(self, model: str) -> int | None:
        """The largest context window a request for public model `model` may reach (None: one
        is unbounded): its deployments, or those of the models it chooses between, and of
        their fallbacks and context-window fallbacks, as the core may send it there."""
        if model in self.windows:
            return self.windows[model]
        cfg, largest, seen = self.config, 0, set()
        todo: list[str] = [model]
        while todo:
            name = todo.pop()
            if name in seen or name not in cfg.models:
                continue
            seen.add(name)
            todo += reachable_models(cfg, name)
            m = cfg.models[name]
            todo += m.fallbacks + m.context_window_fallbacks
            for d in m.deployments:
                window = cfg.deployments[d].context_window
                if window == 0:  # no bound set
                    self.windows[model] = None
                    return None
                largest = max(largest, window)
        self.windows[model] = largest
        return largest


class Reservations(ReadBack, Notifications, Settlement):
    """Budgets of the running config generation and their reservations (a part of `CostControl`)."""

    budgets: list[Budget]
    reserve_max_tokens: int
    reserve_tool_calls: int  # calls of each built-in tool a request sets no bound on
    _block_at: list[int]  # each budget's block threshold in nano-USD (-1: none)
    _any_downgrade: bool
    _periods: dict[str, tuple[float, float, B.Period]]  # budget name -> (valid from, until, its period)
    _prices: list[Prices]  # the ceilings of the running generation (and of the one before)

    def _prices_for(self, cfg: Config) -> Prices:
        """The ceilings of the generation a request runs on; the previous one is kept for
        requests that started before a reload."""
        for p in self._prices:
            if p.config is cfg:
                return p
        p = Prices(cfg, route_ceilings(cfg))
        self._prices = [self._prices[-1], p]
        return p

    def _completion(self, decision: _core.Decision, top: Ceiling) -> int:
        """The output tokens reserved for each answer: the request's own bound, else the most
        its deployments may write unasked (an Anthropic provider's `default_max_tokens`, sent
        for it) or `budgets.reserve_max_tokens`, whichever is more."""
        return decision.max_tokens or max(self.reserve_max_tokens, top.unbounded_output)

    def _first_charges(
        self, decision: _core.Decision, ticket: CostTicket, top: Ceiling, prompt: int, now: float
    ) -> list[B.Charge]:
        """The reservations of the request's maximum cost on its own route."""
        # A Predicted Output's rejected tokens are billed as output beyond max_tokens (cost.prediction).
        completion = (self._completion(decision, top) + ticket.media.prediction) * decision.choices
        hedges = 2 if decision.hedge_after_ms is not None else 1
        prompt += ticket.media.tokens(top.media)
        return self._charges(
            ticket, decision.route, B.charge_nano(self._cost(top, prompt, completion, ticket) * hedges), now
        )

    def _cost(self, top: Ceiling, prompt: int, completion: int, ticket: CostTicket) -> float:
        """The request's worst case at `top`'s prices: its tokens and the tool calls it may make."""
        return top.cost(prompt, completion, ticket.media.tools, self.reserve_tool_calls)

    async def _budgets(
        self,
        decision: _core.Decision,
        rec: RequestRecord,
        ticket: CostTicket,
        prices: Prices,
        top: Ceiling,
        choices: int,
        prompt: int,
        now: float,
        first: AtOnce | None = None,
    ) -> str:
        """Reserves the request's maximum cost (its first reservation made already when `first`
        has it); returns the route reserved for (a downgrade's target)."""
        completion = self._completion(decision, top) * choices
        predicted = ticket.media.prediction * choices  # billed as output beyond max_tokens when rejected
        route = decision.route
        hedges = 2 if decision.hedge_after_ms is not None else 1
        for step in range(2):
            if step == 0 and first is not None and first.reserved is not None:
                charges, res, shared = first.charges, first.reserved, True
            else:
                # The media parts at the allowances of the deployments `top` covers (a downgrade's).
                output = completion + predicted
                estimate = self._cost(top, prompt + ticket.media.tokens(top.media), output, ticket) * hedges
                charges = self._charges(ticket, route, B.charge_nano(estimate), now)
                if not charges:
                    return route
                res, shared = await self._reserve(charges, now)
            if shared:
                self._seen_shared(charges, res)
            target = self._downgrade_to(charges, res.used_before, decision, rec, prices, ticket) if step == 0 else None
            if target is not None:
                rec.admission = f"downgraded:{target[1]}"
                if res.ok:
                    # Undone before reserving again, or the second reservation would see both.
                    # Never journaled: no seed of Redis counted it (request id '').
                    await self._wait([self._adjust(charges, [-c.amount for c in charges], shared, res.generation)])
                route = target[0]
                ticket.reroute = route
                top = prices.routes[route]
                completion = self._completion(decision, top) * choices  # what the target's deployments may write
                hedges = 2 if may_hedge(prices.config, route) else 1  # as the new decision may
                continue
            if not res.ok:
                c = charges[res.blocked]
                rec.outcome = "blocked"
                rec.admission = f"blocked:{c.budget.name}"
                media = ticket.media.tokens(top.media)
                raise _budget_error(
                    c,
                    res.used_before[res.blocked],
                    now,
                    completion,
                    decision.max_tokens is not None,
                    media,
                    predicted,
                    tuple((kind, n + free * self.reserve_tool_calls) for kind, n, free in ticket.media.tools),
                    self.reserved.get(c.store_key, 0),
                    hide=ticket.identity.team is not None and c.budget.scope in _OTHER_TEAMS_COUNT,
                )
            ticket.charges, ticket.charges_shared, ticket.charges_generation = charges, shared, res.generation
            self._hold(rec.request_id, _booked_at(ticket, now), charges)
            return route
        return route

    def _downgrade_to(
        self,
        charges: list[B.Charge],
        used_before: list[int],
        decision: _core.Decision,
        rec: RequestRecord,
        prices: Prices,
        ticket: CostTicket,
    ) -> tuple[str, str] | None:
        """(target model, budget name) of the first downgrade threshold crossed, if any; a target
        that a reload removed from the config is skipped, and so is one that cannot serve the
        request (`CostTicket.can_serve`, or a prompt longer than every context window it
        reaches): the request stays on its model, which the budget's block threshold still
        bounds, rather than failing there as the client's error (a 400 naming a model it never
        asked for). A target passed over for the prompt's length is named in `rec.admission_note`."""
        if not self._any_downgrade:
            return None
        # What the core holds against context windows. An estimate (not exact) is below the
        # smallest window: the core counts exactly whenever the bound could exceed one.
        needed = decision.prompt_tokens + (decision.max_tokens or 0)
        for c, used in zip(charges, used_before, strict=True):
            a = B.crossed(c.budget, used, "downgrade")
            if a is None or a.to is None or a.to == decision.route or a.to not in prices.routes:
                continue
            window = prices.largest_window(a.to)
            if window is not None and needed > window:
                if rec.admission_note is None:
                    rec.admission_note = (
                        f"not downgraded to {a.to} (budget {c.budget.name}): the request needs {needed} tokens,"
                        f" more than its largest context window ({window})"
                    )
                continue
            if ticket.can_serve is None or ticket.can_serve(a.to):
                return a.to, c.budget.name
        return None

    def _charges(self, ticket: CostTicket, route: str, amount: int, now: float) -> list[B.Charge]:
        """The request's charges of `amount`, in the periods of its start: where the ledger books
        its spend (its row's time), so that what a restart or a Redis reseed reads back is what
        was counted. By the admission's time, a request begun before a period's end and admitted
        after it (a long prompt counted first) was counted in the new period and read back in the old."""
        ident = ticket.identity
        now = _booked_at(ticket, now)
        out = []
        for b, block_at in zip(self.budgets, self._block_at, strict=True):
            if ticket.started < self._counted_from.get(b.name, 0.0):
                continue  # started before the reload that added it: counted from the ledger
            subject = _subject(b, ident, route)
            if subject is not None:
                out.append(B.charge(b, subject, self._period(b, now), amount, block_at))
        for b in ident.budgets:  # a managed key's own, then its creators' (governance/keys.py)
            # Its counter holds the month so far whenever the budget was given (`key_counter`).
            assert b.match is not None
            out.append(B.charge(b, b.match, self._period(b, now), amount, B.block_limit(b)))
        return out

    def _period(self, b: Budget, at: float) -> B.Period:
        """The budget's period at `at`, computed once per period (or rolling slot). Requests'
        starts do not come in order: one begun before a period's end may be admitted after
        another begun in the next, so the period kept is checked at both ends."""
        hit = self._periods.get(b.name)
        if hit is not None and hit[0] <= at < hit[1]:
            return hit[2]
        p = B.period_of(b, at)
        start, until = (p.slot * p.slot_s, (p.slot + 1) * p.slot_s) if p.rolling else (p.starts_at, p.resets_at)
        self._periods[b.name] = (start, until, p)
        return p


def _booked_at(ticket: CostTicket, now: float) -> float:
    """The time a request's spend is booked at: its start (its ledger row's), else `now`."""
    return ticket.started or now


def _subject(b: Budget, ident: Identity, route: str) -> str | None:
    scope = b.scope
    if scope == "global":
        return "*"
    if scope == "key":
        value: str | None = ident.key
    elif scope == "team":
        value = ident.team
    elif scope == "user":
        value = ident.user
    else:
        value = route
    if value is None or (b.match is not None and b.match != value):
        return None
    return value


def prompt_upper(decision: _core.Decision) -> int:
    """The prompt's tokens, or a bound no count can exceed: the core's estimate is a quarter of
    the text's bytes (scaled by the encoding), and no token is shorter than a byte. Reserving
    by it keeps exact BPE counting (tens of microseconds per thousand tokens) off the request
    path; a request the bound alone refuses is counted exactly."""
    return decision.prompt_tokens if decision.tokens_exact else 4 * decision.prompt_tokens


def _held_by_requests(c: B.Charge, used: int, in_flight: int) -> bool:
    """Whether the request would fit the budget once the reservations in flight were given back
    (what they spend is not known yet: the budget's room is theirs, not spent)."""
    return 0 < in_flight <= used and used - in_flight + c.amount <= c.block_at


def usd(v: float) -> str:
    """Dollars with cents, or with three significant digits below a cent (a budget of $0.00005
    read "$0.00", and what it had spent "$0.0000")."""
    if v <= 0 or v >= 0.01:
        return f"${v:,.2f}"
    return f"${v:.{min(9, 2 - math.floor(math.log10(v)))}f}"


# Budgets whose spend other teams' requests count too (`budget_report._team_charges` says so).
_OTHER_TEAMS_COUNT = frozenset({"global", "model", "user"})


def _budget_error(
    c: B.Charge,
    used: int,
    now: float,
    completion: int,
    asked: bool,
    media: int = 0,
    predicted: int = 0,
    tools: tuple[tuple[str, int], ...] = (),
    in_flight: int = 0,
    hide: bool = False,
) -> ProxyError:
    """429 for a budget that cannot hold the request's reservation. A budget with room left
    refused it for its worst case, not for spend: it says so, and what reserves less (one that
    read "exhausted" at half its limit left the caller nothing to change). `in_flight`: what
    this process's requests in flight hold of `used` (nano-USD), reserved at their worst case
    and mostly given back when they finish: a budget whose room they hold says so, and to retry
    then (Retry-After 1 s, not the period's end), for the caller could not tell it from spend.
    `hide`: the caller is a team's and the budget counts other teams' spend too: its figures
    are withheld, as `/admin/budgets` withholds them from the team."""
    b = c.budget
    who = "all requests" if b.scope == "global" else f"{b.scope} '{c.subject}'"
    period = {"day": "today", "month": "this month"}.get(b.period) or f"in the last {b.window_hours or 0:g} hours"
    wait = max(1, math.ceil(c.period.resets_at - now))
    if hide:
        message = (
            f"Budget '{b.name}' for {who} has no room for this request {period} (it counts other teams' spend"
            " too, so its figures are not shown)."
        )
        return _budget_refusal(c, message, wait)
    spent = f"{usd(used / B.NANO)} of {usd(b.limit_usd)} spent or reserved {period}"
    held = _held_by_requests(c, used, in_flight)
    if held:
        reserved = f"{usd(in_flight / B.NANO)} reserved by requests in flight"
        spent = f"{usd((used - in_flight) / B.NANO)} spent and {reserved}, of {usd(b.limit_usd)} {period}"
        wait = 1
    if used < c.block_at:
        tokens = f"its max_tokens ({completion:,})" if asked else f"{completion:,} output tokens (it set no max_tokens)"
        if predicted:  # billed at the output price when the answer does not use them
            tokens += f" and its prediction's {predicted:,} tokens"
        if tools:  # billed a call (`max_uses`, `max_tool_calls`: cost.tool_calls)
            tokens += " and " + ", ".join(f"{n:,} {kind} call{'s' * (n > 1)}" for kind, n in tools)
        # Images, audio and files are reserved at allowances (edgeroute.cost.media): named, as
        # a caller cannot tell them from its text.
        parts = f" (with {media:,} tokens for its image, audio and file parts)" if media else ""
        message = (
            f"Budget '{b.name}' for {who} has {usd((c.block_at - used) / B.NANO)} left ({spent}), less than"
            f" this request may cost: up to {usd(c.amount / B.NANO)} for its prompt{parts} and {tokens} at the highest"
            " price of the deployments it may reach. A lower max_tokens reserves less."
        )
    elif held:
        message = f"Budget '{b.name}' for {who} has no room left now: {spent}."
    else:
        message = f"Budget '{b.name}' for {who} is exhausted: {spent}."
    if held:
        message += " The requests in flight give back what they do not spend: retry when they finish."
    return _budget_refusal(c, message, wait)


def _budget_refusal(c: B.Charge, message: str, wait: int) -> ProxyError:
    resets = iso(c.period.resets_at)
    return ProxyError(
        429,
        f"{message} It resets at {resets}.",
        code="budget_exceeded",
        headers={"Retry-After": str(wait), "x-edgeroute-budget": c.budget.name, "x-edgeroute-budget-reset": resets},
    )
