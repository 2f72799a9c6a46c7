"""The request path after the decision: attempts, retries, failover, hedging, relay.

Policy comes from the core's decision (the order of deployments, the hedge delay)
and its budgets (retry and hedge); this module does the I/O and reports every
attempt back to the core. Invariants it keeps:

- exactly one answer reaches the client, never two spliced together: a stream is
  committed to one upstream only when that upstream's first real content arrives,
  and after that an upstream failure ends the stream with an explicit error event;
- every attempt, won, lost or cancelled, is reported to the core and recorded;
- client errors (400, 404 model unknown upstream, 413, ...) are returned, not retried.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

from edgeroute import _core, sse
from edgeroute.accounting import (
    AttemptRecord,
    RequestRecord,
    Usage,
    cost_of,
    estimate_answer_usage,
    estimate_stream_usage,
)
from edgeroute.config import Timeouts
from edgeroute.errors import ProxyError
from edgeroute.providers import ErrorClass
from edgeroute.state import Live
from edgeroute.upstream import DeploymentInfo
from edgeroute.upstream_http import Response, UpstreamError, UpstreamTlsError

log = logging.getLogger("edgeroute.dispatch")

TAIL_BYTES = 8192
_MAX_RETRY_AFTER_S = 86_400.0  # a longer (or non-finite) Retry-After is read as a day
_SLOW_CLIENT_BYTES = 16 * 1024  # unsent bytes to a client above which its stream's idle timer stops


@dataclass(slots=True)
class Failure:
    cls: ErrorClass
    status: int | None
    message: str
    retry_after_s: float | None = None
    body: bytes = b""


_PRELOADED: set[str] = set()


def preload_tokenizer(encoding: str) -> None:
    """Loads a tokenizer's tables (~50 ms, tens of MB) in a worker thread, once per process,
    while the upstream prepares its answer: a stream that carries no usage is counted when it
    ends, and loading them there would stall the event loop. Not at start-up: many configs
    never count, and the tables would double the idle memory."""
    if encoding not in _PRELOADED:
        _PRELOADED.add(encoding)
        asyncio.get_running_loop().run_in_executor(None, _core.Router.count_tokens, "warm up: caf\u00e9", encoding)


@dataclass(slots=True)
class JsonAnswer:
    body: bytes
    usage: Usage | None


@dataclass(slots=True)
class StreamAnswer:
    """An upstream stream that has produced its first real content (or ended cleanly)."""

    resp: Response
    head: bytes  # OpenAI-format SSE bytes read so far, to send first
    translator: Any
    rec: AttemptRecord | None = None  # the attempt that produced it, settled when the stream ends


Answer = JsonAnswer | StreamAnswer

# What each error class tells the core about the deployment's health. A context-window
# overflow or a policy refusal is about the request, not the deployment.
_HEALTH_OUTCOME: dict[
    ErrorClass, Literal["client_error", "rate_limited", "server_error", "timeout", "connect_error"]
] = {
    ErrorClass.RATE_LIMIT: "rate_limited",
    ErrorClass.SERVER: "server_error",
    ErrorClass.TIMEOUT: "timeout",
    ErrorClass.CONNECT: "connect_error",
    ErrorClass.CONTEXT_WINDOW: "client_error",
    ErrorClass.CONTENT_POLICY: "client_error",
    ErrorClass.CLIENT: "client_error",
    ErrorClass.AUTH: "server_error",
}

_FALLBACK_KEYS = {
    ErrorClass.RATE_LIMIT: "rate_limit",
    ErrorClass.SERVER: "server_error",
    ErrorClass.CONNECT: "server_error",
    ErrorClass.AUTH: "server_error",
    ErrorClass.TIMEOUT: "timeout",
    ErrorClass.CONTEXT_WINDOW: "context_window",
    ErrorClass.CONTENT_POLICY: "content_policy",
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER_S)


class Call:
    """One client request's dispatch over the decision's deployments."""

    def __init__(
        self,
        live: Live,
        decision: _core.Decision,
        body: bytes,
        record: RequestRecord,
        timeouts: Timeouts,
        max_attempts: int,
    ) -> None:
        self.live = live
        self.router = live.router
        self.decision = decision
        self.body = body
        self.record = record
        self.timeouts = timeouts
        self.max_attempts = max_attempts
        self.stream = decision.stream
        self.deadline = asyncio.get_running_loop().time() + timeouts.total
        self.failures: list[tuple[DeploymentInfo, Failure]] = []
        self._exact_prompt: int | None = None
        if decision.stream and not decision.include_usage:
            preload_tokenizer(decision.encoding)  # the stream is counted when it ends
        self.hedged = False

    # -- one attempt ---------------------------------------------------------

    async def attempt(self, dep: DeploymentInfo, hedge: bool = False) -> Answer | Failure:
        up = self.live.upstreams[dep.provider]
        adapter = up.adapter
        body = self.router.body_for(self.body, self.decision, dep.index) if adapter.passthrough else self.body
        req = adapter.build(dep.model, body, self.stream)
        rec = AttemptRecord(dep.name, dep.provider, "pending", None, 0.0, hedge=hedge)
        self.record.attempts.append(rec)
        self.router.begin(dep.index)
        t0 = time.perf_counter()
        resp: Response | None = None
        keep_open = False
        result: Answer | Failure
        try:
            loop = asyncio.get_running_loop()
            # One timer per attempt: the first-byte deadline, moved to the overall one once headers arrived.
            async with asyncio.timeout(min(self.timeouts.first_byte, self._remaining())) as deadline:
                resp = await up.client.request("POST", req.url, req.headers, req.body)
                rec.status = resp.status
                if resp.status >= 400:
                    data = await resp.read()
                    cls = adapter.classify(resp.status, data)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    msg = adapter.error_message(resp.status, data)
                    if cls is ErrorClass.AUTH:
                        # For the operator's log only: the client learns that our credentials failed.
                        log.warning("deployment %s refused our credentials: %s", dep.name, msg[:300])
                        msg = f"The provider refused edgeroute's credentials for this deployment (HTTP {resp.status})."
                    result = Failure(cls, resp.status, msg, retry_after, data)
                elif self.stream:
                    result = await self._hold_stream(resp, adapter)
                    keep_open = isinstance(result, StreamAnswer)
                else:
                    deadline.reschedule(loop.time() + self._remaining())
                    result = self._json_answer(await resp.read(), adapter)
        except TimeoutError:
            result = Failure(ErrorClass.TIMEOUT, None, "no answer within the timeout")
        except UpstreamTlsError as e:
            result = Failure(ErrorClass.CONNECT, None, f"TLS handshake failed: {e.reason}")
        except (UpstreamError, OSError) as e:
            result = Failure(ErrorClass.CONNECT, None, f"connection failed: {type(e).__name__}")
        except Exception as e:
            # An answer the adapter could not read (bad usage, a malformed event): the
            # deployment's fault, like a 5xx, so fail over; the core hears of it below.
            log.exception("unreadable answer from deployment %s", dep.name)
            result = Failure(ErrorClass.SERVER, rec.status, f"upstream answer could not be read ({type(e).__name__})")
        except asyncio.CancelledError:
            # A lost hedge or a client that went away: close the connection, account for it.
            rec.outcome = "cancelled"
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            self.router.report(dep.index, "client_error", rec.latency_ms)
            # The upstream has likely billed the prompt already: cost it as such.
            self.settle_attempt(rec, dep, None)
            if resp is not None:
                resp.close()
            raise
        finally:
            if resp is not None and not keep_open:
                # Pooled already if the whole answer arrived; else (a failure mid-body) dropped: the upstream sees it.
                resp.close()
        latency = (time.perf_counter() - t0) * 1000
        rec.latency_ms = latency
        if isinstance(result, Failure):
            rec.outcome = result.cls.value if result.cls.retryable else "client_error"
            rec.error = result.message
            retry_ms = int(result.retry_after_s * 1000) if result.retry_after_s is not None else None
            self.router.report(dep.index, _HEALTH_OUTCOME[result.cls], latency, retry_ms)
        else:
            rec.outcome = "success"
            self.router.report(dep.index, "success", latency)
            if isinstance(result, JsonAnswer):
                self.settle_attempt(rec, dep, result.usage)
            else:
                result.rec = rec
        return result

    def _json_answer(self, data: bytes, adapter: Any) -> JsonAnswer | Failure:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return Failure(ErrorClass.SERVER, 200, "upstream sent malformed JSON")
        if not isinstance(obj, dict):
            return Failure(ErrorClass.SERVER, 200, "upstream sent an unexpected JSON value")
        if not adapter.passthrough:
            obj = adapter.translate_response(obj)
            obj["model"] = obj.get("model") or self.decision.model  # Bedrock's answers do not name it
            data = orjson.dumps(obj)
        elif "choices" not in obj:
            return Failure(ErrorClass.SERVER, 200, "upstream answer has no choices")
        usage = Usage.from_openai(obj.get("usage"))
        if usage is None:  # none reported (or unreadable): count it, so that no spend goes unrecorded
            usage = estimate_answer_usage(self.prompt_tokens(), obj, self.decision.encoding)
        return JsonAnswer(data, usage)

    async def _hold_stream(self, resp: Response, adapter: Any) -> StreamAnswer | Failure:
        """Reads until the first real content event, so that an error before it can fail over."""
        translator = (
            None if adapter.passthrough else adapter.stream_translator(self.decision.model, self.decision.include_usage)
        )
        buf = b""
        head = b""
        while True:
            chunk = await resp.readany()
            if not chunk:
                return Failure(ErrorClass.SERVER, resp.status, "upstream stream ended before any content")
            if translator is not None:
                chunk = translator.feed(chunk)
            head += chunk
            buf += chunk
            events, buf = sse.split_events(buf)
            for ev in events:
                data = sse.event_data(ev)
                if data is None:
                    continue
                if data == b"[DONE]":
                    return StreamAnswer(resp, head, translator)
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    return Failure(ErrorClass.SERVER, resp.status, "upstream sent a malformed stream event")
                if isinstance(obj, dict) and obj.get("error"):
                    err = obj["error"]
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    return Failure(ErrorClass.SERVER, resp.status, f"upstream stream error: {msg}"[:500])
                if _has_content(obj):
                    return StreamAnswer(resp, head, translator)

    def _remaining(self) -> float:
        return max(0.001, self.deadline - asyncio.get_running_loop().time())

    def prompt_tokens(self) -> int:
        """Exact prompt tokens, for accounting when the upstream reports no usage
        (the decision may have only estimated them; counted once, here, if so)."""
        if self._exact_prompt is None:
            exact = self.decision.tokens_exact
            self._exact_prompt = self.decision.prompt_tokens if exact else self.router.count_prompt(self.body)
        return self._exact_prompt

    def settle_attempt(self, rec: AttemptRecord, dep: DeploymentInfo, usage: Usage | None) -> None:
        """Fills in an attempt's usage (the upstream's, else the prompt alone) and its cost."""
        if usage is None:
            usage = Usage(prompt_tokens=self.prompt_tokens(), estimated=True)
        rec.usage = usage
        rec.cost_usd = cost_of(dep.price, usage)

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
                    result = await self.attempt(dep)
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
        t1 = asyncio.ensure_future(self.attempt(first))
        tasks = {t1: first}
        try:
            done, _ = await asyncio.wait({t1}, timeout=delay)
            if done or not self.router.try_hedge(self.decision.route):
                return await t1, first, 1
            self.hedged = True
            t2 = asyncio.ensure_future(self.attempt(second, hedge=True))
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
        status = f.status or 400
        return ProxyError(status, f.message, code="upstream_client_error" if status != 404 else "model_not_found")

    def _exhausted(self) -> ProxyError:
        details = [
            {"deployment": d.name, "status": f.status, "error": f.cls.value, "message": f.message}
            for d, f in self.failures
        ]
        classes = {f.cls for _, f in self.failures}
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


def _has_content(obj: Any) -> bool:
    """Whether a chunk carries something a user would see (text, tool call, refusal, finish)."""
    if not isinstance(obj, dict):
        return False
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal") or delta.get("function_call"):
            return True
        if choice.get("finish_reason"):
            return True
    return bool(obj.get("usage")) and not obj.get("choices")


# Set on a request once its stream response is prepared: from then on an error can only end
# the stream (an error event), never become a second response (errors_middleware checks it).
STREAM_STARTED = web.RequestKey("stream_started", bool)


async def relay_stream(
    request: web.Request,
    answer: StreamAnswer,
    response_headers: dict[str, str],
    idle_timeout: float,
    call: Call,
    dep: DeploymentInfo,
    encode: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:
    """Sends the held head, then each upstream chunk as it arrives, unmerged.

    `encode` turns the OpenAI-format events (including the error events written here)
    into another API's stream format, e.g. Anthropic's for `/v1/messages`. The stream
    ends by the request's total timeout at the latest.
    """
    # The streamed text is kept (references to chunks already read) so that a stream that
    # ends without usage, by design or cut short, is still costed for what it produced.
    text: list[bytes] = [answer.head]
    tail = answer.head[-TAIL_BYTES:]
    translator = answer.translator
    completed = sse.DONE in answer.head
    loop = asyncio.get_running_loop()
    failure: tuple[str, str] | None = None
    upstream_broke = False
    out = web.StreamResponse(status=200, headers=response_headers)
    out.content_type = "text/event-stream"
    out.headers["Cache-Control"] = "no-cache"
    try:
        await out.prepare(request)
        request[STREAM_STARTED] = True

        async def send(data: bytes) -> None:
            data = encode(data) if encode is not None else data
            if data:
                await out.write(data)

        await send(answer.head)
        try:
            # One timer for the whole stream: the idle timeout, capped by the total deadline.
            # Moving it costs a timer-heap operation, so it is moved at most once per `slack`,
            # to `idle_timeout + slack` from then: a stall is reported after between 1 and 1.1
            # idle timeouts of silence. It stops while a slow client is written to (a slow
            # reader is not an upstream stall).
            slack = idle_timeout / 10
            armed = loop.time()
            transport = request.transport
            async with asyncio.timeout_at(min(armed + idle_timeout + slack, call.deadline)) as idle:
                while not completed:
                    chunk = await answer.resp.readany()
                    if not chunk:
                        upstream_broke = True
                        failure = (
                            "The upstream ended the stream early; the answer is incomplete.",
                            "stream_incomplete",
                        )
                        break
                    if translator is not None:
                        chunk = translator.feed(chunk)
                    if chunk:
                        # A write waits for the client only once its transport holds more than
                        # its high-water mark (64 KiB by default): stop the timer well before.
                        if (
                            transport is not None
                            and transport.get_write_buffer_size() + len(chunk) > _SLOW_CLIENT_BYTES
                        ):
                            idle.reschedule(call.deadline)
                            armed = -math.inf
                        await send(chunk)
                        tail = (tail + chunk)[-TAIL_BYTES:]
                        text.append(chunk)
                        completed = sse.DONE in tail[-(len(chunk) + len(sse.DONE)) :]
                    now = loop.time()
                    if now - armed > slack:
                        armed = now
                        idle.reschedule(min(now + idle_timeout + slack, call.deadline))
        except TimeoutError:
            if loop.time() >= call.deadline:
                failure = (
                    "The answer took longer than the request's total timeout; it is incomplete.",
                    "stream_timeout",
                )
            else:
                upstream_broke = True
                failure = ("The upstream stalled mid-stream; the answer is incomplete.", "stream_timeout")
        except OSError:  # UpstreamError, or a failed write to the client
            transport = request.transport
            if transport is None or transport.is_closing():
                # The client went away (its socket failed a write): nothing to tell it.
                call.record.outcome = "client_gone"
                raise
            upstream_broke = True
            failure = ("The upstream connection broke mid-stream; the answer is incomplete.", "stream_interrupted")
        except Exception:
            log.exception("unreadable stream from deployment %s", dep.name)
            upstream_broke = True
            failure = (
                "The upstream sent a stream edgeroute could not read; the answer is incomplete.",
                "stream_interrupted",
            )
        if failure is not None:
            await send(sse.error_event(*failure))
            call.record.outcome = "stream_interrupted"
        await out.write_eof()
    finally:
        if completed and failure is None:
            answer.resp.release()  # what may follow [DONE] is the stream's end: keep the connection
        else:
            answer.resp.close()
        if upstream_broke:
            call.router.report_broken_stream(dep.index)
        usage = Usage.from_openai(sse.find_usage(tail) or (translator.usage if translator is not None else None))
        if usage is None:
            usage = estimate_stream_usage(call.prompt_tokens(), b"".join(text), call.decision.encoding)
        if answer.rec is not None:
            call.settle_attempt(answer.rec, dep, usage)
    return out
