"""The loop over a request's attempts, and the hedging race.

The mechanism only: it asks the request's `FailoverPolicy` what to do next, makes
the attempt, and hands the policy what happened, until an answer or a `Stop`. Health
reports that the policy may still judge to be the request's fault (a poison request)
are held here and sent when the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

from edgeroute.accounting import AttemptRecord
from edgeroute.admission import AttemptGate
from edgeroute.config import Rule
from edgeroute.dispatch.attempt import Answer, Attempts, Failure, JsonAnswer, StreamAnswer
from edgeroute.dispatch.policy import FailoverPolicy, FailoverState, Settings, Stop, Try, signature
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome
from edgeroute.state import ServerState
from edgeroute.upstream import DeploymentInfo

log = logging.getLogger("edgeroute.dispatch")

# A deployment counts as serving (for the poison check) if it answered successfully this recently.
SERVING_WINDOW_S = 60.0


# A deployment skipped for its own setup, logged once a minute at most: every request (and every
# free `/v1/route/explain`) finds it so, and a tenant could flood the log at its key's RPM.
MISCONFIGURED_LOG_S = 60.0
_misconfigured_logged: dict[str, float] = {}


def _log_misconfigured(name: str, why: str) -> None:
    now = time.monotonic()
    if now - _misconfigured_logged.get(name, -MISCONFIGURED_LOG_S) >= MISCONFIGURED_LOG_S:
        _misconfigured_logged[name] = now
        log.error("deployment %s skipped: %s (logged once a minute)", name, why)


class Call(Attempts):
    """One client request's dispatch over the decision's deployments."""

    spilled: list[str] | None = None  # deployments passed over because they were at capacity
    # Takes a deployment's provider limit for an attempt admission did not count, gives back the
    # one admission counted for a first choice that cannot read the request; None: no deployment
    # has one. Set by the endpoint (`Admission.attempt_gate`).
    gate: AttemptGate | None = None
    first_counted = True  # admission took the first deployment's limit (not for a shadow mirror)
    _queue_deadline: float | None = None
    _full_elsewhere: frozenset[int] = frozenset()  # shared capacity refused a lease on these
    _side: tuple[str | None] | None = None  # `side_effect()`, once asked

    def side_effect(self) -> str | None:
        """What of the request acts upstream beyond its answer (`side_effects`), or None: such a
        request is not hedged, nor sent elsewhere once an upstream may have run it. Read once,
        and only when a hedge or a retry would follow."""
        if self._side is None:
            self._side = (self.find_side_effect(),)
        return self._side[0]

    def find_side_effect(self) -> str | None:
        """`side_effect()` for this endpoint's request (chat: none; its server tools only search)."""
        return None

    def policy(self) -> FailoverPolicy:
        """The failover policy for this request, from the live config and the decision (its
        questions are this call's methods: no closures made per request)."""
        live, decision = self.live, self.decision
        retry, cool_down_ms = live.config.retry, live.config.health.max_ejection_ms
        return FailoverPolicy(
            decision.model,
            live.config.models[decision.route].deployments,
            Settings(self.max_attempts, retry.base_ms, retry.max_ms, retry.max_retry_after_s, cool_down_ms / 1000),
            fallbacks_on=self._fallback_deployments,
            allowed=self._allowed,
            is_open=self._is_open,
            try_retry=self._try_retry,
            remaining=self._remaining,
            serving=self._serving,
            is_full=self._is_full if live.capacity.bounded else None,
            # Asked per deployment only while some deployment is ejected for a sender at all.
            sender_ejected=self._sender_ejected if self.router.any_sender_ejection() else None,
            once=self.side_effect,
        )

    def _try_retry(self) -> bool:
        # The route's own budget: another route's healthy traffic funds none of its retries.
        return self.router.try_retry(self.decision.route)

    def _is_full(self, index: int) -> bool:
        return index != self.granted and (
            index in self._full_elsewhere or self.live.capacity.full(index, self.decision.priority)
        )

    def _serving(self, index: int) -> bool:
        return time.monotonic() - self.live.served_at.get(index, -SERVING_WINDOW_S) < SERVING_WINDOW_S

    def _is_open(self, index: int) -> bool:
        return self.router.health(index)["circuit"] == "open"

    def _sender_ejected(self, index: int) -> bool:
        return self.router.ejected_for(index, self.sender)

    def _fallback_deployments(self, key: str) -> Sequence[DeploymentInfo] | None:
        """The deployments of the models `fallbacks_on` names under `key`, in order; for
        `context_window` without its own entry, the route's `context_window_fallbacks` (which the
        core reads only for a prompt it counted past every window: one an upstream said was too
        long for it was answered 400, the larger model never asked)."""
        cfg = self.live.config
        model = cfg.models[self.decision.route]
        names = cast("dict[str, list[str]]", model.fallbacks_on).get(key)
        if names is None and key == Outcome.CONTEXT_WINDOW.value:
            names = model.context_window_fallbacks or None
        if names is None:
            return None
        table, index_of = self.live.deployments, self.live.index_of
        return [table[index_of[d]] for name in names for d in cfg.models[name].deployments]

    def _allowed(self, dep: DeploymentInfo) -> bool:
        """Whether the decision's rule permits `dep` (its deployments, required and excluded tags)."""
        rule = self._rule()
        if rule is None:
            return True
        then = rule.then
        if then.deployments and dep.name not in then.deployments:
            return False
        # `provider:NAME` is implied for every deployment, as the core's rules see it.
        tags = {*self.live.config.deployments[dep.name].tags, f"provider:{dep.provider}"}
        return all(t in tags for t in then.require_tags) and not any(t in tags for t in then.exclude_tags)

    def _rule(self) -> Rule | None:
        name = self.decision.rule
        if name is None:
            return None
        return next((r for r in self.live.config.rules if r.name == name), None)

    # -- the loop -------------------------------------------------------------------------

    async def run_until_drain(self, server: ServerState) -> tuple[Answer, DeploymentInfo]:
        """`run`, for a client's request: cut at the drain's end (`ServerState.begin_drain`)
        while still waiting on its upstream, it answers a 503 in the API's format, recorded
        `drain_cut` (its attempts cancelled and priced as for a client gone)."""
        with server.cut_at_drain_end(self.record):
            return await self.run()

    async def run(self) -> tuple[Answer, DeploymentInfo]:
        policy = self.policy()
        table = self.live.deployments
        state = policy.start([table[i] for i in self.decision.order])
        if (
            state.sender_skipped
            and self.gate is not None
            and self.first_counted
            and state.sender_skipped[0].index == self.decision.order[0]
        ):
            self.gate.give_back(state.sender_skipped[0].name)  # admission counted it as the first choice: never sent
            self.first_counted = False
        # Sent on: what funds retries and its route's hedges (not a refusal, a cache hit, an explanation).
        self.router.fund_budgets(self.decision.route)
        hedge_ms = self.decision.hedge_after_ms
        if hedge_ms is not None and self.side_effect() is not None:
            hedge_ms = None  # a second upstream would repeat what the request does there
        stop: Stop | None = None
        try:
            step = policy.next_attempt(state, None)
            while True:
                if isinstance(step, Stop) and step.error_class == "capacity":
                    # Passed over as full before their requests were built: those that cannot read
                    # it are out, and with none left to wait for, the request gets its 400 (a
                    # 429 "retry shortly" had clients retry what no wait lets through).
                    await self._screen(policy, state, lambda d: d in state.spilled)
                    if not state.spilled:
                        step = policy.next_attempt(state, None)
                if isinstance(step, Stop) and step.error_class == "capacity" and await self._queue(state):
                    self._full_elsewhere = frozenset()
                    policy.restart(state)
                    step = policy.next_attempt(state, None)
                    continue
                if not isinstance(step, Try):
                    break
                if step.wait > 0:
                    await asyncio.sleep(step.wait)  # a new round's backoff, whichever deployment it starts with
                dep = step.deployment
                if not await self._readable(dep):
                    await self._skip_unreadable(policy, state, dep)
                    step = policy.next_attempt(state, None)
                    continue
                if self.live.capacity.shared is not None and self.live.capacity.bounded and not await self._claim(dep):
                    step = policy.passed_over(state, dep)
                    continue
                if self.gate is not None and not await self._gate(dep, step.kind):
                    step = policy.passed_over(state, dep)  # at its provider's limit: as if full
                    continue
                if step.kind == "first":
                    self.time_by(dep)
                if self.decision.spilled or state.spilled:
                    # The core placed the deployments full at decision time last; the policy saw the rest.
                    full = [table[i].name for i in self.decision.spilled]
                    self.spilled = full + [d.name for d in state.spilled if d.name not in full]
                second = policy.hedge_target(state) if hedge_ms is not None and step.kind == "first" else None
                if second is not None and hedge_ms is not None:
                    result, dep = await self._race(dep, second, hedge_ms / 1000, policy, state)
                    hedge_ms = None
                else:
                    result = await self.attempt(dep, step.kind)
                if not isinstance(result, Failure):
                    return result, dep
                # Choosing one whose circuit is open spends a retry: found out before, not after.
                await self._screen(policy, state, lambda d: self._is_open(d.index))
                step = policy.next_attempt(state, (dep, result))
            stop = step
            self.record.error_class = stop.error_class
            if stop.poison:
                names = ", ".join(d.name for d in state.called)
                log.warning(
                    "poison request %s: the same server error from %s; not retried, not counted against their health",
                    self.record.request_id,
                    names,
                )
            raise stop.error()
        finally:
            if state.unreadable:
                self.record.skipped = [(d.name, e.message) for d, e in state.unreadable]
            if self.granted is not None:  # handed a slot it did not use (another had room first)
                self.live.capacity.release(self.granted)
                self.granted = None
            for index in self.claimed:  # leases for attempts never made (the request did not fit)
                self.live.capacity.unclaim(index)
            self.claimed.clear()
            self._report_deferred(stop)

    async def _readable(self, dep: DeploymentInfo) -> bool:
        """Whether `dep` can read this request: its request is built before any call, and kept
        for the attempt that follows; a refusal to build it (a `ProxyError`: what the deployment
        cannot take) is remembered for the rest of the request."""
        verdicts = self._verdicts
        if dep.index in verdicts:
            return verdicts[dep.index] is None
        try:
            req = await self._upstream_request_soon(self.live.upstreams[dep.provider].adapter, dep)
        except ProxyError as e:
            verdicts[dep.index] = e
            if e.status >= 500:  # not the request's doing: the deployment's setup (no AWS credentials)
                _log_misconfigured(dep.name, e.message)
            if self.gate is not None and self.first_counted and dep.index == self.decision.order[0]:
                self.gate.give_back(dep.name)  # admission counted it as the first choice: never sent
            return False
        verdicts[dep.index] = None
        self._prepared = (dep.index, req, self.loop.time())
        return True

    async def readers(
        self, until_one: bool = False
    ) -> tuple[list[DeploymentInfo], list[tuple[DeploymentInfo, ProxyError]]]:
        """The decision's deployments that can read the request, and those that cannot with why,
        in its order, as dispatch finds them (`_readable`), before any call; `until_one`: up to
        the first that can."""
        table = self.live.deployments
        can: list[DeploymentInfo] = []
        cannot: list[tuple[DeploymentInfo, ProxyError]] = []
        for index in self.decision.order:
            dep = table[index]
            if await self._readable(dep):
                can.append(dep)
                if until_one:
                    break
            else:
                cannot.append((dep, self._refusal(dep)))
        return can, cannot

    async def refuse_unreadable(self) -> None:
        """Raises what dispatch answers a request none of the decision's deployments can read (the
        first one's 400, the skips in the record) without making the dispatch: for a request
        refused before it (a provider limit of a deployment it would never be sent to)."""
        can, cannot = await self.readers(until_one=True)
        if not can and cannot:
            self.record.skipped = [(d.name, e.message) for d, e in cannot]
            raise cannot[0][1]

    async def _screen(
        self, policy: FailoverPolicy, state: FailoverState, which: Callable[[DeploymentInfo], bool]
    ) -> None:
        """Takes out of the plan the deployments `which` picks that cannot read the request (each
        built once a request; the others are found out when chosen, before any call)."""
        for dep in list(state.plan):
            if dep.index not in self._verdicts and which(dep) and not await self._readable(dep):
                policy.cannot_read(state, dep, self._refusal(dep), chosen=False)

    async def _skip_unreadable(self, policy: FailoverPolicy, state: FailoverState, dep: DeploymentInfo) -> None:
        """`dep`, just chosen, cannot read the request: skipped. A first choice the weighted
        strategy drew is drawn again, by weight, among the route's own that can read it."""
        policy.cannot_read(state, dep, self._refusal(dep), chosen=True)
        if state.attempts == 0 and self.decision.strategy == "weighted":
            await self._screen(policy, state, lambda d: d.name in policy.own)
            deployments = self.live.config.deployments
            policy.redraw_first(state, lambda d: deployments[d.name].weight)

    def _refusal(self, dep: DeploymentInfo) -> ProxyError:
        why = self._verdicts[dep.index]
        assert why is not None
        return why

    async def _gate(self, dep: DeploymentInfo, kind: str) -> bool:
        """Whether `dep` may take one more attempt under its provider limit (taken if so); the
        first attempt on the decision's first deployment was counted by admission."""
        if kind == "first" and dep.index == self.decision.order[0] and self.first_counted:
            return True
        assert self.gate is not None
        return await self.gate.take(dep.name)

    async def _claim(self, dep: DeploymentInfo) -> bool:
        """With shared capacity, a lease on `dep` for the next attempt (False: the fleet has it
        full, and it is passed over for the rest of this round)."""
        capacity = self.live.capacity
        if self.granted == dep.index or capacity.limits[dep.index] is None:
            return True
        if not await capacity.claim(dep.index, self.decision.priority):
            self._full_elsewhere |= {dep.index}
            return False
        self.claimed.append(dep.index)
        return True

    async def _queue(self, state: FailoverState) -> bool:
        """Every deployment is full: waits in the queue of the first deployment in the
        decision's order that has one, for a slot on any of the plan's (True: the slot is
        this request's), unless the queue is full or its deadline passes (False). Higher
        classes are served first, keys in turn within one."""
        capacity = self.live.capacity
        order = self.decision.order
        first = next((i for i in order if capacity.queues[i]), order[0])
        loop = asyncio.get_running_loop()
        if self._queue_deadline is None:
            self._queue_deadline = loop.time() + min(capacity.queue_timeouts[first], self._remaining())
        if self.granted is not None:
            capacity.release(self.granted)
            self.granted = None
        started = loop.time()
        try:
            wanted = [d.index for d in state.plan]
            key = self.record.key or ""
            self.granted = await capacity.wait(first, wanted, self._queue_deadline, self.decision.priority, key)
            return self.granted is not None
        finally:
            self.record.queue_ms += (loop.time() - started) * 1000

    def _report_deferred(self, stop: Stop | None) -> None:
        """Sends the held health reports: the poison request's failures as the request's
        fault (not the deployments'), every other one as the server error it was."""
        if not self.deferred:
            return
        poison = None
        if stop is not None and stop.request_fault:
            poison = signature(self.deferred[-1][2])
        for index, latency, f in self.deferred:
            fault = Outcome.CLIENT_ERROR if poison is not None and signature(f) == poison else f.outcome
            self.report_health(index, fault, latency)
        self.deferred.clear()

    async def _race(
        self, first: DeploymentInfo, second: DeploymentInfo, delay: float, policy: FailoverPolicy, state: FailoverState
    ) -> tuple[Answer | Failure, DeploymentInfo]:
        """Runs `first`; if it has not answered after `delay`, hedges to `second`. One wins.

        Whatever way this ends (a winner, both failed, the client gone), every attempt
        still running is cancelled and awaited here, so its cost is settled before the
        request is recorded. When both fail, the first to fail is noted with the policy
        and the last is returned for the loop to ask about.
        """
        mark = len(self.record.attempts)  # this race's attempts are recorded from here on
        t1 = asyncio.ensure_future(self.attempt(first, "first"))
        tasks = {t1: first}
        winner: tuple[Answer, DeploymentInfo] | None = None
        try:
            done, _ = await asyncio.wait({t1}, timeout=delay)
            hedge: DeploymentInfo | None = second
            while not done and hedge is not None and not await self._readable(hedge):
                policy.cannot_read(state, hedge, self._refusal(hedge), chosen=False)  # never hedged to
                hedge = policy.hedge_target(state)
            if done or hedge is None:
                return await t1, first
            second = hedge
            full = self.live.capacity.full(second.index, self.decision.priority)
            if full or (self.live.capacity.shared is not None and not await self._claim(second)):
                return await t1, first
            if (
                t1.done()
                or not self.router.try_hedge(self.decision.route)
                or (self.gate is not None and not await self._gate(second, "hedge"))
            ):
                if self.claimed and self.claimed[-1] == second.index:  # no hedge after all: its lease back
                    self.claimed.pop()
                    self.live.capacity.unclaim(second.index)
                return await t1, first
            self.hedged = True
            policy.hedged(state)
            t2 = asyncio.ensure_future(self.attempt(second, "hedge"))
            tasks[t2] = second
            pending = {t1, t2}
            failed: list[tuple[DeploymentInfo, Failure]] = []
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in (t1, t2):  # the primary first when both finished together
                    if t not in done:
                        continue
                    try:
                        res = t.result()
                    except ProxyError as e:
                        if t is t1:
                            raise  # the request does not fit the primary: as without a hedge
                        res = Failure(Outcome.CLIENT_ERROR, e.status, e.message, sent=False)  # the hedge cannot take it
                    if isinstance(res, Failure):
                        failed.append((tasks[t], res))
                    elif winner is None:
                        winner = (res, tasks[t])
                    else:
                        self._discard(res, tasks[t])  # both answered at once: one answer only
            if winner is not None:
                if winner[1] is second:
                    self.record.outcome = "hedge_won"
                return winner
        finally:
            running = [t for t in tasks if not t.done()]
            if winner is not None and running:
                # They lost: their reports say so (not a client's cancellation), which is how a
                # primary that hangs while its hedges win is found out (`report_lost_race`).
                self.lost_race = frozenset(tasks[t].index for t in running)
            for t in running:
                t.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
                self.lost_race = frozenset()
                if winner is not None and isinstance(winner[0], JsonAnswer):
                    self._price_lost_answers(self.record.attempts[mark:], list(tasks.values()), winner[0])
        for dep, f in failed[:-1]:
            policy.note(state, dep, f)
        last_dep, last = failed[-1]
        return last, last_dep

    def _price_lost_answers(self, attempts: list[AttemptRecord], deps: list[DeploymentInfo], won: JsonAnswer) -> None:
        """Prices a non-streamed attempt that lost the race as if it had answered like the
        winner: its upstream was sent the request and, unlike a stream's, goes on writing the
        whole answer after the connection closes, and bills it. Priced at its prompt alone,
        every hedge that lost understated the ledger by an answer. The winner's output (at
        most `max_tokens` a choice) is the estimate; the record says it is one."""
        if won.usage is None or not won.usage.completion_tokens:
            return
        d = self.decision
        output = won.usage.completion_tokens
        if d.max_tokens:
            output = min(output, d.max_tokens * d.choices)
        by_name = {dep.name: dep for dep in deps}
        for rec in attempts:
            billed, dep = rec.usage, by_name.get(rec.deployment)
            if rec.outcome == "cancelled" and billed is not None and not billed.completion_tokens and dep is not None:
                self.settle_attempt(rec, dep, replace(billed, completion_tokens=output, estimated=True))

    def _discard(self, answer: Answer, dep: DeploymentInfo) -> None:
        """Drops an answer that lost a tie; a stream's prompt is likely billed already."""
        if isinstance(answer, StreamAnswer):
            answer.resp.close()
            if answer.slot is not None:
                self.live.capacity.release(answer.slot)
                answer.slot = None
            if answer.rec is not None:
                answer.rec.outcome = "cancelled"
                self.settle_attempt(answer.rec, dep, None)
