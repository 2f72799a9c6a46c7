"""The loop over a request's attempts: retries, failover and the hedging race.

Policy comes from the core's decision (the order of deployments, the hedge delay)
and its budgets (retry and hedge); this module runs attempts in that order and
turns what they return into one answer or one error.
"""

from __future__ import annotations

import asyncio
import random

from edgeroute.dispatch.attempt import Answer, Attempts, Failure, StreamAnswer
from edgeroute.errors import ProxyError
from edgeroute.providers import ErrorClass
from edgeroute.upstream import DeploymentInfo

_FALLBACK_KEYS = {
    ErrorClass.RATE_LIMIT: "rate_limit",
    ErrorClass.SERVER: "server_error",
    ErrorClass.CONNECT: "server_error",
    ErrorClass.AUTH: "server_error",
    ErrorClass.TIMEOUT: "timeout",
    ErrorClass.CONTEXT_WINDOW: "context_window",
    ErrorClass.CONTENT_POLICY: "content_policy",
}


class Call(Attempts):
    """One client request's dispatch over the decision's deployments."""

    # -- the loop over attempts ----------------------------------------------

    async def run(self) -> tuple[Answer, DeploymentInfo]:
        table = self.live.deployments
        order = [table[i] for i in self.decision.order]
        pos = 0
        attempts = 0
        rounds = 0
        hedge_ms = self.decision.hedge_after_ms
        while attempts < self.max_attempts and self._remaining() > 0.001:
            if pos >= len(order):
                # Every deployment failed once: back off (full jitter, honouring Retry-After) and go round again.
                rounds += 1
                wait = self._backoff(rounds)
                if wait is None or wait >= self._remaining():
                    break
                await asyncio.sleep(wait)
                pos = 0
            if attempts > 0 and not self.router.try_retry():
                self.failures.append((order[pos], Failure(ErrorClass.SERVER, None, "retry budget exhausted")))
                break
            dep = order[pos]
            pos += 1
            attempts += 1
            if hedge_ms is not None and rounds == 0 and pos < len(order):
                result, dep, used = await self._race(dep, order[pos], hedge_ms / 1000)
                pos += used - 1
                attempts += used - 1
                hedge_ms = None
            else:
                try:
                    result = await self.attempt(dep, self._kind(dep, attempts))
                except ProxyError as e:
                    if not self.failures:
                        raise  # the request does not fit the deployment the decision chose: say why
                    # A fallback that cannot take this request (e.g. a parameter it does not support): skip it.
                    self.failures.append((dep, Failure(ErrorClass.CLIENT, e.status, e.message)))
                    continue
            if not isinstance(result, Failure):
                return result, dep
            self.failures.append((dep, result))
            extra = self._class_fallbacks(result.cls, dep, order)
            if result.cls is ErrorClass.CONTEXT_WINDOW and dep.context_window:
                # Deployments no larger than the one that overflowed would overflow too.
                order[pos:] = [d for d in order[pos:] if not 0 < d.context_window <= dep.context_window]
            order[pos:pos] = extra
            overflow_only = result.cls is ErrorClass.CONTEXT_WINDOW and pos >= len(order)
            if (not result.cls.retryable or overflow_only) and not extra:
                raise self._client_error(result)
        raise self._exhausted()

    def _kind(self, dep: DeploymentInfo, attempts: int) -> str:
        """An attempt's kind for the record: the first, a retry on the route's own deployments, or a fallback."""
        if attempts <= 1:
            return "first"
        own = self.live.config.models[self.decision.route].deployments
        return "retry" if dep.name in own else "fallback"

    def _class_fallbacks(
        self, cls: ErrorClass, failed: DeploymentInfo, order: list[DeploymentInfo]
    ) -> list[DeploymentInfo]:
        """Deployments of the models configured in `fallbacks_on` for this class of error."""
        key = _FALLBACK_KEYS.get(cls)
        model = self.live.config.models[self.decision.route]
        if key is None or key not in model.fallbacks_on:
            return []
        table = self.live.deployments
        out = []
        for name in model.fallbacks_on[key]:
            for dep_name in self.live.config.models[name].deployments:
                d = table[self.live.index_of[dep_name]]
                if d in order or d in out or self.router.health(d.index)["circuit"] == "open":
                    continue
                if cls is ErrorClass.CONTEXT_WINDOW and 0 < d.context_window <= failed.context_window:
                    continue
                out.append(d)
        return out

    async def _race(
        self, first: DeploymentInfo, second: DeploymentInfo, delay: float
    ) -> tuple[Answer | Failure, DeploymentInfo, int]:
        """Runs `first`; if it has not answered after `delay`, hedges to `second`. One wins.

        Whatever way this ends (a winner, both failed, the client gone), every attempt
        still running is cancelled and awaited here, so its cost is settled before the
        request is recorded.
        """
        t1 = asyncio.ensure_future(self.attempt(first, "first"))
        tasks = {t1: first}
        try:
            done, _ = await asyncio.wait({t1}, timeout=delay)
            if done or not self.router.try_hedge(self.decision.route):
                return await t1, first, 1
            self.hedged = True
            t2 = asyncio.ensure_future(self.attempt(second, "hedge"))
            tasks[t2] = second
            pending = {t1, t2}
            last: tuple[Answer | Failure, DeploymentInfo] | None = None
            winner: tuple[Answer, DeploymentInfo] | None = None
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
                        res = Failure(ErrorClass.CLIENT, e.status, e.message)  # the hedge cannot take it
                    if isinstance(res, Failure):
                        self.failures.append((tasks[t], res))
                        last = (res, tasks[t])
                    elif winner is None:
                        winner = (res, tasks[t])
                    else:
                        self._discard(res, tasks[t])  # both answered at once: one answer only
            if winner is not None:
                if winner[1] is second:
                    self.record.outcome = "hedge_won"
                return winner[0], winner[1], 2
        finally:
            running = [t for t in tasks if not t.done()]
            for t in running:
                t.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        assert last is not None
        # Both failed: the caller records the last failure; the first is already in self.failures.
        self.failures.pop()
        return last[0], last[1], 2

    def _discard(self, answer: Answer, dep: DeploymentInfo) -> None:
        """Drops an answer that lost a tie; a stream's prompt is likely billed already."""
        if isinstance(answer, StreamAnswer):
            answer.resp.close()
            if answer.rec is not None:
                answer.rec.outcome = "cancelled"
                self.settle_attempt(answer.rec, dep, None)

    def _backoff(self, rounds: int) -> float | None:
        cfg = self.live.config.retry
        waits = [f.retry_after_s for _, f in self.failures[-len(self.decision.order) :] if f.retry_after_s is not None]
        if waits:
            wait = min(waits)
            return None if wait > cfg.max_retry_after_s else wait
        cap = min(cfg.max_ms, cfg.base_ms * (2**rounds)) / 1000
        return random.uniform(0, cap)

    def _client_error(self, f: Failure) -> ProxyError:
        self.record.error_class = f.cls.value
        status = f.status or 400
        return ProxyError(status, f.message, code="upstream_client_error" if status != 404 else "model_not_found")

    def _exhausted(self) -> ProxyError:
        details = [
            {"deployment": d.name, "status": f.status, "error": f.cls.value, "message": f.message}
            for d, f in self.failures
        ]
        classes = {f.cls for _, f in self.failures}
        if self.failures:
            self.record.error_class = self.failures[-1][1].cls.value
        if classes and classes <= {ErrorClass.TIMEOUT}:
            status, code = 504, "upstream_timeout"
        elif classes and classes <= {ErrorClass.RATE_LIMIT}:
            status, code = 429, "upstream_rate_limited"
        elif not classes:
            status, code = 503, "no_deployment_available"
        else:
            status, code = 502, "upstream_failed"
        tried = ", ".join(sorted({d.name for d, _ in self.failures})) or "none"
        waits = [f.retry_after_s for _, f in self.failures if f.retry_after_s is not None]
        hdrs = {"Retry-After": str(max(1, int(min(waits) + 0.999)))} if waits and status == 429 else {}
        return ProxyError(
            status,
            f"All deployments for model '{self.decision.model}' failed (tried: {tried}).",
            code=code,
            headers=hdrs,
            details=details,
        )
