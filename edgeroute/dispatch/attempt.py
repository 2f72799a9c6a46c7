"""One upstream attempt and the reading of its answer.

An attempt sends the request to one deployment, reads the answer (a JSON body, or a
stream held until its first real content so that an error before it can still fail
over), classifies a failure, and reports the outcome to the core and the request's
record. Which deployment to try, and whether to try again, is not decided here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime
import email.utils
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import orjson

from edgeroute import _core, redact, sse
from edgeroute.accounting import (
    OVERRAN,
    AttemptRecord,
    RequestRecord,
    Usage,
    answer_text,
    cost_of,
    estimate_answer_usage,
)
from edgeroute.cache.entry import replay_chunks
from edgeroute.config import Timeouts
from edgeroute.cost import overreport, underreport
from edgeroute.cost.prices import unbounded_output
from edgeroute.cost.received import cut_usage, received_usage
from edgeroute.dispatch import senders
from edgeroute.dispatch.body_pace import pacer
from edgeroute.dispatch.deadline import Deadline
from edgeroute.dispatch.output_cap import output_limit
from edgeroute.dispatch.stream_usage import with_stream_usage
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome
from edgeroute.providers.base import Adapter, UpstreamRequest, in_band_status
from edgeroute.state import Live
from edgeroute.upstream import DeploymentInfo
from edgeroute.upstream_http.errors import UpstreamProtocolError, UpstreamTlsError
from edgeroute.upstream_http.response import Response

log = logging.getLogger("edgeroute.dispatch")

_MAX_RETRY_AFTER_S = 86_400.0  # a longer (or non-finite) Retry-After is read as a day
# A non-streamed answer over this is refused as the upstream's failure (memory is the bound;
# the largest real answers, embeddings of 2,048 inputs as JSON floats, stay under it).
MAX_ANSWER_BYTES = 128 * 1024 * 1024
# An error answer (4xx, 5xx) over this is cut here: its message is all edgeroute reads of it, and
# it was read whole (a body that never ended, until the first-byte timeout).
MAX_ERROR_BYTES = 1024 * 1024
# Answers over this are parsed, translated and counted (when they carry no usage) in a worker
# thread: counting a 16 MB answer took seconds, all of them the event loop's otherwise.
OFF_LOOP_BYTES = 16 * 1024
# A prompt over this is counted exactly in a worker thread, from its first attempt on (while
# the upstream answers): the count of a hostile prompt (a piece of two megabytes of one letter)
# took 1.8 s, and a client that went away made the loop do it to price the cancelled attempt.
COUNT_ON_LOOP_BYTES = 16 * 1024
# Past this size a body is parsed or translated in Python in a worker thread (the endpoints'
# parse, an upstream request's build): that work holds the GIL, but the loop takes it back
# every switch interval instead of after the whole body.
PARSE_ON_LOOP_BYTES = 1 << 20
# Their own threads: a flood of huge answers must not hold up the default pool's other work
# (the ledger's flushes, key polls, secret refreshes).
COUNTING = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgeroute-count")


@dataclass(slots=True)
class Failure:
    outcome: Outcome
    status: int | None
    message: str
    retry_after_s: float | None = None
    body: bytes = b""
    sent: bool = True  # False: the deployment could not take the request, so it was never called
    # After a 2xx head: the answer as received (a JSON body, a stream's held events), which
    # prices the attempt (`cost.received`); `cut`: instead, the size of a body cut short (over
    # the bound, or broken mid-body), all that prices it (keeping the bytes held 128 MiB a failure).
    received: bytes | None = None
    cut: int | None = None
    usage: Usage | None = None  # a whole answer's own, when it was not what the client asked for
    again: bool = True  # False: the deployment would answer so again (and be paid): not tried again
    reached: bool = True  # False: never written to a connection (the upstream cannot have run it)
    # A client error an upstream sent inside a 200 (`in_band_failure`): failed over as a server
    # error whose health report waits (a sick vLLM replica labels its crashes `"code": 400`), and
    # the client's 4xx once a second deployment says the same, or none is left to ask.
    in_band: bool = False

    @property
    def maybe_the_requests(self) -> bool:
        """Whether the failure could be the request's own fault (a poison request): a server
        error with an HTTP status other than those that mean an unwell or overloaded server."""
        return self.in_band or (
            self.sent
            and self.outcome is Outcome.SERVER_ERROR
            and self.status is not None
            and self.status >= 500
            and self.status not in _INFRA_STATUSES
        )


# 5xx statuses that say "the server is unwell or overloaded", never "this request is bad":
# the same one from two deployments is an outage, not a poison request.
_INFRA_STATUSES = frozenset({502, 503, 504})


_PRELOADED: set[str] = set()


def preload_tokenizer(encoding: str) -> None:
    """Loads a tokenizer's tables (~50 ms, tens of MB) in a worker thread, once per process,
    while the upstream prepares its answer: a stream that carries no usage is counted when it
    ends, and loading them there would stall the event loop. The server warms its deployments'
    encodings at start; this covers an encoding that a reload brought in."""
    if encoding not in _PRELOADED:
        _PRELOADED.add(encoding)
        asyncio.get_running_loop().run_in_executor(None, _core.Router.count_tokens, "warm up: caf\u00e9", encoding)


# How long a request built to see whether its deployment can read it may wait to be sent: one
# passed over (full, at its provider's limit, a hedge not sent) may be tried much later, after
# a queue or a slow primary, and a signed request (Bedrock's SigV4) ages; built again then.
PREPARED_FRESH_S = 5.0


@dataclass(slots=True)
class JsonAnswer:
    body: bytes
    usage: Usage | None
    # The body its reader parsed and the object it got (a native Messages or Responses answer):
    # its ids are read from that object with tenants, not parsed again, while `body` is that body.
    read: tuple[bytes, dict[str, Any]] | None = None


@dataclass(slots=True)
class StreamAnswer:
    """An upstream stream that has produced its first real content (or ended cleanly)."""

    resp: Response
    head: bytes  # OpenAI-format SSE bytes read so far, to send first
    translator: Any
    rec: AttemptRecord | None = None  # the attempt that produced it, settled when the stream ends
    slot: int | None = None  # the deployment whose capacity slot it holds, given back when the stream ends
    # Awaited once the last event is written, before the stream's end reaches the client.
    before_end: Callable[[], Awaitable[None]] | None = None
    usage: Usage | None = None  # a whole JSON answer's, served as a stream (`_stream_of_json`)


Answer = JsonAnswer | StreamAnswer


async def read_up_to(
    resp: Response,
    limit: int,
    each: Callable[[], None] | None = None,
    chunks: list[bytes] | None = None,
    *,
    keep_cut: bool = True,
) -> tuple[bytes, bool]:
    """An upstream body, read to its end or to `limit` bytes: (the bytes, whether that was its
    end). Past `limit` the rest is not read (the caller drops the connection), and with
    `keep_cut` false nothing of it is kept (b""): an answer's first 128 MiB, joined and sliced
    on the loop, cost three copies and half a second of every client's time, for nothing
    (a cut answer is priced by its size). `each` runs after every piece (e.g. to move an idle
    timer); `chunks` collects the pieces (what had arrived when the read failed)."""
    size = 0
    if chunks is None:
        chunks = []
    while chunk := await resp.readany():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if not keep_cut:
                chunks.clear()
                return b"", False
            return b"".join(chunks)[:limit], False
        if each is not None:
            each()
    return b"".join(chunks), True


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
        except OverflowError:  # a year past any calendar: later than a day, as "1e30" is
            return _MAX_RETRY_AFTER_S
        if when.tzinfo is None:  # HTTP dates are GMT
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER_S)


class Attempts:
    """One client request's attempts: the state they share, and how one attempt is made
    and its answer read. The loop over attempts (`failover.Call`) builds on it."""

    # Whether a relayed stream's chunks are a legacy completion's (`text`), not chat's (`delta`).
    text_chunks: ClassVar[bool] = False

    def __init__(
        self,
        live: Live,
        decision: _core.Decision,
        body: bytes,
        record: RequestRecord,
        timeouts: Timeouts | None,
        max_attempts: int,
    ) -> None:
        self.live = live
        self.router = live.router
        self.decision = decision
        self.body = body
        self.record = record
        # Whose request the core's health counts it as: its failures alone eject a deployment
        # for it only (`senders`).
        self.sender = senders.sender_of(record.team, record.key)
        # The route's own timeouts (`timeouts`), else the provider's of the deployment the request
        # is first sent to (`time_by`): the decision's first until one is chosen.
        self.own_timeouts = timeouts is not None
        self.timeouts = timeouts or live.config.providers[live.deployments[decision.order[0]].provider].timeouts
        self.max_attempts = max_attempts
        self.stream = decision.stream
        # Kept: each `asyncio.get_running_loop()` is a getpid() system call on Python 3.11 (~0.5 µs).
        self.loop = asyncio.get_running_loop()
        self.begun = self.loop.time()
        self.deadline = self.begun + self.timeouts.total
        # Server errors that may turn out to be the request's own fault (see `policy`): their
        # health report waits until the request ends: (deployment index, latency, failure).
        self.deferred: list[tuple[int, float, Failure]] = []
        self._exact_prompt: int | None = None
        self._counting: asyncio.Future[int] | None = None  # a long prompt's count in a worker thread
        if decision.stream and not decision.include_usage:
            preload_tokenizer(decision.encoding)  # the stream is counted when it ends
        # Set once an attempt asked its upstream for the usage the client did not ask for (see
        # `upstream_request`): the relay then keeps the usage chunk from the client.
        self.usage_added = False
        self.hedged = False
        # The deployments whose attempts are being cancelled because a hedge race's other one
        # answered (`failover._race`): reported as lost races, not as the client's cancellation.
        self.lost_race: frozenset[int] = frozenset()
        self.granted: int | None = None  # a capacity slot handed over while queued, not yet used
        self.claimed: list[int] = []  # shared capacity leases taken for attempts not yet started
        # By deployment: None once its request was built, else why it cannot read the request.
        self._verdicts: dict[int, ProxyError | None] = {}
        # The last request built, not yet sent: (deployment, request, loop time it was built).
        self._prepared: tuple[int, UpstreamRequest, float] | None = None

    def time_by(self, dep: DeploymentInfo) -> None:
        """Without timeouts of its route's own, the request is timed by the provider of `dep`,
        its first attempt's (the decision's first may be skipped or passed over): a skipped chat
        deployment's `first_byte` of 5 s timed out the Anthropic one that read the request."""
        if self.own_timeouts:
            return
        timeouts = self.live.config.providers[dep.provider].timeouts
        if timeouts is not self.timeouts:
            self.timeouts = timeouts
            self.deadline = self.begun + timeouts.total

    async def attempt(self, dep: DeploymentInfo, kind: str = "first") -> Answer | Failure:
        self._start_counting()
        up = self.live.upstreams[dep.provider]
        adapter = up.adapter
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] == dep.index and self.loop.time() - prepared[2] < PREPARED_FRESH_S:
            req = prepared[1]  # built when the deployment was found to read the request
        else:
            req = await self._upstream_request_soon(adapter, dep)
        rec = AttemptRecord(
            dep.name, dep.provider, "pending", None, 0.0, hedge=kind == "hedge", started_at=time.time(), kind=kind
        )
        self.record.attempts.append(rec)
        if self.record.trace is not None:  # traced: the upstream continues the trace (W3C traceparent)
            rec.span_id = self.record.trace.inject(req.headers)
        self.router.begin(dep.index, self.sender)
        if self.granted == dep.index:
            self.granted = None  # the slot a freed deployment handed this request while it waited
        else:
            if dep.index in self.claimed:
                self.claimed.remove(dep.index)  # its lease now goes with the slot
            self.live.capacity.take(dep.index)
        t0 = time.perf_counter()
        resp: Response | None = None
        keep_open = False
        result: Answer | Failure
        reached: list[bool] = []  # non-empty once the request is written to the upstream
        got: list[bytes] = []  # a JSON body's pieces as read (a failure mid-body is priced by them)
        try:
            loop = self.loop
            # One timer per attempt: the first-byte deadline, moved to the overall one once headers arrived.
            with Deadline(loop, loop.time() + min(self.timeouts.first_byte, self._remaining())) as deadline:
                resp = await up.client.request("POST", req.url, req.headers, req.body, lambda: reached.append(True))
                rec.status = resp.status
                if 300 <= resp.status < 400:
                    # Following it would send our credentials wherever the upstream points: never.
                    result = Failure(
                        Outcome.SERVER_ERROR,
                        resp.status,
                        f"the upstream answered with a redirect (HTTP {resp.status}), which edgeroute does not"
                        " follow; check the provider's base_url",
                    )
                elif resp.status >= 400:
                    result = await _error_answer(resp, adapter, dep)
                elif self.stream:
                    if _is_json(resp):  # a server that ignores `stream: true`: its whole answer
                        result = await self._stream_of_json(resp, adapter, deadline)
                    else:
                        result = await self._hold_stream(resp, adapter)
                    if isinstance(result, StreamAnswer):
                        rec.ttft_ms = (time.perf_counter() - t0) * 1000
                        keep_open = True
                        result.slot = dep.index
                elif resp.complete:  # the usual JSON answer: it came with its headers, no timer to move
                    result = await self._answer(await resp.read(), adapter, resp.status)
                else:
                    # The body: each piece within the idle timeout, the whole within its allowance (`body_pace`).
                    more = pacer(loop, deadline, self.timeouts.idle, self.deadline, got)
                    data, whole = await read_up_to(resp, MAX_ANSWER_BYTES, more, got, keep_cut=False)
                    if not whole:
                        result = _too_large(resp.status)
                    else:
                        result = await self._answer(data, adapter, resp.status)
        except Exception as e:
            result = _failure_of(e, rec.status, dep)
            if got:
                result.cut = sum(map(len, got))
                got.clear()
        except asyncio.CancelledError:
            # A lost hedge or a client that went away: close the connection, account for it.
            rec.outcome = "cancelled"
            rec.latency_ms = (time.perf_counter() - t0) * 1000
            if dep.index in self.lost_race:
                # Whether it had answered (its head came) and how long it waited tell a hung
                # deployment, whose circuit then opens, from one merely slower than its hedge.
                answering = rec.status is not None
                aside = self.router.report_lost_race(dep.index, rec.latency_ms, answering, self.sender)
                senders.ejected(dep.name, aside)
            else:
                self.router.report(dep.index, "client_error", rec.latency_ms, None, self.sender)
            # Sent, the upstream has likely billed the prompt already: cost it as such.
            if reached:
                self.settle_attempt(rec, dep, None)
            if resp is not None:
                resp.close()
            raise
        finally:
            if not keep_open:
                self.live.capacity.release(dep.index)
            if resp is not None and not keep_open:
                # Pooled already if the whole answer arrived; else (a failure mid-body) dropped: the upstream sees it.
                resp.close()
        self._report(rec, dep, result, (time.perf_counter() - t0) * 1000)
        if isinstance(result, Failure) and not reached:
            result.reached = False  # a side-effect request may still fail over (`side_effects`)
        if isinstance(result, Failure) and reached and (result.outcome is Outcome.TIMEOUT or _ok(rec.status)):
            # Given up on as a cancelled attempt is (the connection dropped while the upstream
            # worked on it), or failed after a 200: the prompt, and what was received, are
            # likely billed. Priced at nothing, a failover after a timeout, or a request whose
            # every attempt timed out, spent outside every budget.
            await self._settle_failed(rec, dep, result)
        if self._refused_stream_options(result, adapter):
            return await self.attempt(dep, "retry")  # at once, without the field
        return result

    def _refused_stream_options(self, result: Answer | Failure, adapter: Adapter) -> bool:
        """Whether the upstream refused the `stream_options` edgeroute added to the request (a
        server that forbids unknown fields: Mistral's 422, an old Azure version's 400). Learned
        for the provider until a reload builds its adapter anew: its streams then go without it,
        counted from their text, rather than every one failing as the client's error."""
        if not (self.usage_added and isinstance(result, Failure) and result.status in (400, 422)):
            return False
        if b"stream_options" not in result.body:
            return False
        log.warning("provider %s refuses stream_options: its streams are counted from their text", adapter.name)
        setattr(adapter, "unsupported", getattr(adapter, "unsupported", frozenset()) | {"stream_options"})  # noqa: B010
        self.usage_added = False
        return True

    def _report(self, rec: AttemptRecord, dep: DeploymentInfo, result: Answer | Failure, latency: float) -> None:
        """What the record and the core hear of a finished attempt; a JSON answer is settled now,
        a stream once it ends (`relay`)."""
        rec.latency_ms = latency
        if isinstance(result, Failure):
            rec.outcome = result.outcome.value
            rec.error = result.message
            if result.maybe_the_requests:
                self.deferred.append((dep.index, latency, result))
            else:
                retry_ms = int(result.retry_after_s * 1000) if result.retry_after_s is not None else None
                self.report_health(dep.index, result.outcome, latency, retry_ms)
        else:
            rec.outcome = "success"
            self.router.report(dep.index, "success", latency, None, self.sender)
            self.live.served_at[dep.index] = time.monotonic()
            if isinstance(result, JsonAnswer):
                # The body bounds the answer's text (no token is shorter than a byte).
                size = len(result.body)
                usage = result.usage and self.bounded(result.usage, lambda: size, f"deployment {dep.name}")
                self.settle_attempt(rec, dep, usage)
                if usage is result.usage:  # a capped one was told of already
                    self.check_overrun(dep, usage)
                result.usage = usage
            else:
                result.rec = rec

    def report_health(self, index: int, outcome: Outcome, latency: float, retry_ms: int | None = None) -> None:
        """Reports a failed attempt to the core as this request's sender's; logs an ejection
        for this sender alone (its failures alone tripped while others were seen)."""
        aside = self.router.report(index, outcome.value, latency, retry_ms, self.sender)
        senders.ejected(self.live.deployments[index].name, aside)

    def output_allowance(self) -> int:
        """Output tokens an answer carries beside what the request's bound covers (a completions
        `echo` repeats the prompt): the output cap (`output_cap.py`) lets them through."""
        return 0

    def bounded(self, usage: Usage, text_bytes: Callable[[], int], source: str) -> Usage:
        """`usage`, or what a real provider could have billed the request for where the upstream
        reported more (`cost.overreport`: output past the request's bound, a prompt past the bytes
        sent), logged and flagged. `text_bytes`: the UTF-8 bytes of the answer's text, or a bound
        on them (asked only when the output is past the bound)."""
        d = self.decision
        limit = None if d.prediction is not None else output_limit(d.max_tokens, d.choices)
        if limit is not None:
            limit += self.output_allowance()
        over = limit is not None and usage.completion_tokens > limit
        prompt = max(usage.prompt_tokens, usage.cached_tokens + usage.cache_write_tokens)
        margin = overreport.PROMPT_MARGIN_TOKENS
        if not over and prompt <= len(self.body) + margin:
            return usage  # the usual case: two comparisons
        if (body := self.usage_body()) is None:
            return usage
        over = over and overreport.output_bounded(body)
        most_prompt = overreport.prompt_bound(body, d.other_parts) if prompt > len(body) + margin else None
        if not over and most_prompt is None:
            return usage
        fix = overreport.check(usage, limit if over else None, text_bytes() if over else 0, most_prompt)
        if fix is None:
            return usage
        log.warning("%s: %s", source, fix.reason)
        self.record.error_class = OVERRAN if fix.output else overreport.CODE
        return fix.usage

    def usage_body(self) -> bytes | None:
        """The client's request as JSON, which `bounded` reads for what makes a provider bill
        more (a stored conversation, server tools, a thinking budget); None: not bounded. A chat
        request's body is the client's; another endpoint's `body` is the routing body edgeroute
        made of it, without those: bounded on it, honest bills were charged a fraction."""
        return self.body

    def check_overrun(self, dep: DeploymentInfo, usage: Usage | None) -> None:
        """A whole answer past the request's bound cannot be stopped: it is charged as the upstream
        reports it (what its provider bills), and the operator told (as a stream's is, `relay`)."""
        d = self.decision
        limit = output_limit(d.max_tokens, d.choices)
        if limit is not None and usage is not None and usage.completion_tokens > limit:
            log.warning(
                "deployment %s answered %d output tokens past max_tokens %s x %d (edgeroute's limit %d)",
                dep.name,
                usage.completion_tokens,
                d.max_tokens,
                d.choices,
                limit,
            )
            self.record.error_class = OVERRAN

    async def _upstream_request_soon(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        """`upstream_request`, in a worker thread for a large body: building it may parse and
        re-serialise the whole body (a stream's `stream_options`, a provider's own format). On
        the loop, a 14 MB stream with `stream_options` held every other request for 0.3-0.5 s,
        at each attempt."""
        if len(self.body) > PARSE_ON_LOOP_BYTES:
            return await asyncio.to_thread(self.upstream_request, adapter, dep)
        return self.upstream_request(adapter, dep)

    def upstream_request(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        """The request for `dep` (other endpoints than chat override it)."""
        body = self.router.body_for(self.body, self.decision, dep.index) if adapter.passthrough else self.body
        if (
            adapter.passthrough
            and self.stream
            and not self.decision.include_usage
            and "stream_options" not in getattr(adapter, "unsupported", ())
        ):
            # A stream the client asked without usage is still asked upstream with it: counted
            # from its text instead, a reasoning model's hidden reasoning tokens (billed as
            # output, never streamed) were priced at nothing, whatever budget held the key.
            body = with_stream_usage(body)
            self.usage_added = True
        return adapter.build(dep.model, body, self.stream)

    async def _answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        """`_json_answer`, in a worker thread for a large answer (the core counts with the GIL
        released, so the event loop serves meanwhile)."""
        if self._counting is not None and not self._counting.done():
            await asyncio.shield(self._counting)  # an answer without usage is priced with it
        if len(data) < OFF_LOOP_BYTES:
            got = self._json_answer(data, adapter, status)
        else:
            # In the task's context (an embeddings batch's piece lives in a context variable): the
            # thread saw none, and a Titan piece's answer over 256 KiB was read as the whole batch's.
            run = contextvars.copy_context().run
            got = await self.loop.run_in_executor(COUNTING, run, self._json_answer, data, adapter, status)
        if type(got) is Failure:
            got.received = data  # what prices it
        return got

    def _json_answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return Failure(Outcome.SERVER_ERROR, status, "upstream sent malformed JSON")
        if not isinstance(obj, dict):
            return Failure(Outcome.SERVER_ERROR, status, "upstream sent an unexpected JSON value")
        if not adapter.passthrough:
            keys = adapter.answer_keys
            if (failed := error_in_200(adapter, obj, status, keys)) is not None:
                return failed
            if obj.get("type") == "error" or (keys and not any(k in obj for k in keys)):
                # A careless upstream's 200 carrying an error (`{"type": "error", ...}`) read as an
                # answer was an empty one for the client, paid for, and never failed over.
                msg = redact.cut(f"upstream answered 200 without an answer: {adapter.error_message(status, data)}", 500)
                return Failure(Outcome.SERVER_ERROR, status, msg)
            obj = adapter.translate_response(obj)
            obj["model"] = obj.get("model") or self.decision.model  # Bedrock's answers do not name it
            data = orjson.dumps(obj)
        elif (failed := error_in_200(adapter, obj, status, ("choices",))) is not None:
            return failed
        elif (unreadable := _unreadable_choices(obj)) is not None:
            # An answer the OpenAI SDK reads as a crash in its client's code (a choice that is a
            # string or null, a null message) was a 200, recorded as served and never failed over.
            return Failure(Outcome.SERVER_ERROR, status, f"upstream answer {unreadable}")
        said = sound_usage(obj)
        if said == "repaired":
            data = orjson.dumps(obj)
        usage = Usage.from_openai(obj.get("usage"), answered=True)
        if usage is None:  # none reported (or unreadable): count it, so that no spend goes unrecorded
            usage = estimate_answer_usage(self.prompt_tokens(), obj, self.decision.encoding)
            if said == "absurd":  # the count, not the garbage, for the client and cache
                obj["usage"] = openai_usage(usage)
                data = orjson.dumps(obj)
        elif underreport.impossible(usage.completion_tokens, len(data)):  # the body bounds its text
            fix = underreport.check(usage, answer_text(obj), self.decision.encoding)
            usage = self.charged(usage, fix, f"provider {adapter.name}")
        return JsonAnswer(data, usage)

    def charged(self, usage: Usage, fix: underreport.Corrected | None, source: str) -> Usage:
        """The usage to charge: `fix`'s where the upstream's report was impossible for its
        answer's text (logged, and the request's error class says so), else `usage`."""
        if fix is None:
            return usage
        log.warning("%s: %s", source, fix.reason)
        self.record.error_class = fix.code
        return fix.usage

    async def _stream_of_json(self, resp: Response, adapter: Any, deadline: Deadline) -> StreamAnswer | Failure:
        """A stream request answered with a whole JSON answer (a server that ignores `stream`),
        served as a stream of it, charged by its usage. Retried as a failure, each such answer
        was paid for and priced at its prompt alone, and the request failed after every attempt."""
        pieces: list[bytes] = []
        more = pacer(self.loop, deadline, self.timeouts.idle, self.deadline, pieces)
        data, whole = await read_up_to(resp, MAX_ANSWER_BYTES, more, pieces, keep_cut=False)
        if not whole:
            return _too_large(resp.status)
        got = await self._answer(data, adapter, resp.status)
        if isinstance(got, Failure):
            return got
        events = self.stream_of(got)
        if events is None:  # no stream of this API's answers is made here: charged, not served
            msg = "the upstream answered a stream request with a whole JSON answer"
            return Failure(Outcome.SERVER_ERROR, resp.status, msg, usage=got.usage, again=False)
        return StreamAnswer(resp, events, None, usage=got.usage)

    def stream_of(self, got: JsonAnswer) -> bytes | None:
        """A chat answer as the stream that delivers it (as the response cache replays one), a
        legacy completion's as its chunks; None for another API's (other endpoints override it)."""
        obj = orjson.loads(got.body)
        choices = obj.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            return None
        usage = self.decision.include_usage
        if usage and obj.get("usage") is None and got.usage is not None:
            # OpenAI's stream ends with the usage asked for: the answer reported none, so the
            # one it is charged at (counted from its text).
            obj["usage"] = openai_usage(got.usage)
        if all("message" in c for c in choices):
            chunks: Iterable[dict[str, Any]] = replay_chunks(obj, usage)
        elif all(isinstance(c.get("text"), str) for c in choices):
            chunks = _text_chunks(obj, usage)
        else:
            return None
        return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + sse.DONE + b"\n\n"

    async def _hold_stream(self, resp: Response, adapter: Any) -> StreamAnswer | Failure:
        """Reads until the first real content event, so that an error before it can fail over."""
        parsed: list[dict[str, Any] | None] | None = None
        if adapter.passthrough:
            # Relayed as they come: checked, so that an unreadable one is the upstream's error;
            # the objects it parsed to check them are read here (each event parsed once).
            translator: Any = sse.ChatChunks(self.decision.choices, self.text_chunks)
            parsed = translator.parsed = []
        else:
            translator = adapter.stream_translator(self.decision.model, self.decision.include_usage)
        # An error event before content is a failover, never relayed: one never ended is
        # bounded as the relay's guard bounds it (it was held until the first-byte timeout).
        events_of = sse.EventSplitter(error_limit=sse.HOLD_BYTES)
        head: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = await resp.readany()
                if not chunk:
                    msg = "upstream stream ended before any content"
                    return Failure(Outcome.SERVER_ERROR, resp.status, msg, received=b"".join(head))
                if translator is not None:
                    chunk = translator.feed(chunk)
                head.append(chunk)
                size += len(chunk)
                for obj in parsed if parsed is not None else _objects(events_of.feed(chunk)):
                    if obj is None:
                        # `[DONE]` before any content or finish (`has_content` commits on one): the
                        # client has seen nothing, so the deployment's failure, failed over. Relayed,
                        # it was an empty "successful" answer, paid for, the next deployment never asked.
                        msg = "upstream stream ended before any content"
                        return Failure(Outcome.SERVER_ERROR, resp.status, msg, received=b"".join(head))
                    if obj is _MALFORMED:
                        msg = "upstream sent a malformed stream event"
                        return Failure(Outcome.SERVER_ERROR, resp.status, msg, received=b"".join(head))
                    if obj.get("error"):
                        return in_band_failure(
                            adapter, obj["error"], resp.status, b"".join(head), "upstream stream error"
                        )
                    if self.has_content(obj):
                        return StreamAnswer(resp, b"".join(head), translator)
                if parsed is not None:
                    parsed.clear()
                if size > sse.HOLD_BYTES:
                    # A megabyte of well-formed events and still nothing a user would see (a long
                    # reasoning phase, or keep-alives): relayed from here, not held without bound.
                    return StreamAnswer(resp, b"".join(head), translator)
        except OSError as e:
            if isinstance(e, TimeoutError | UpstreamProtocolError):
                raise
            # Answered 200, then broken before any content: not a connection that failed (a
            # route's `fallbacks_on: connect_error` is not for it); priced by what it held (its usage).
            msg = "upstream stream broke before any content"
            return Failure(Outcome.SERVER_ERROR, resp.status, msg, received=b"".join(head))
        finally:
            if parsed is not None:
                translator.parsed = None  # the relay keeps none

    def has_content(self, obj: Any) -> bool:
        """Whether a stream event carries something a user would see (other endpoints override it)."""
        return has_content(obj)

    def _remaining(self) -> float:
        return max(0.001, self.deadline - self.loop.time())

    def count_prompt(self) -> int:
        """The prompt's exact token count (the decision may have only estimated it). It may run
        in a worker thread: endpoints whose prompt is not a chat body override it."""
        d = self.decision
        return d.prompt_tokens if d.tokens_exact else self.router.count_prompt(self.body)

    def _start_counting(self) -> None:
        if self._counting is None and self._exact_prompt is None and len(self.body) > COUNT_ON_LOOP_BYTES:
            run = contextvars.copy_context().run
            self._counting = self.loop.run_in_executor(COUNTING, run, self.count_prompt)

    def prompt_tokens(self) -> int:
        """Exact prompt tokens, for accounting when the upstream reports no usage (counted once).
        A long prompt is counted in a worker thread: until that count is in, the decision's
        estimate (a cancelled attempt is priced at once, not after seconds of the event loop)."""
        if self._exact_prompt is None:
            counting = self._counting
            if counting is None and len(self.body) <= COUNT_ON_LOOP_BYTES:
                self._exact_prompt = self.count_prompt()
            elif counting is not None and counting.done() and not counting.cancelled() and not counting.exception():
                self._exact_prompt = counting.result()
            else:
                return self.decision.prompt_tokens
        return self._exact_prompt

    async def counted_prompt(self) -> int:
        """`prompt_tokens()`, waiting for a long prompt's count in its worker thread."""
        self._start_counting()
        if self._counting is not None and not self._counting.done():
            await asyncio.shield(self._counting)
        return self.prompt_tokens()

    async def _settle_failed(self, rec: AttemptRecord, dep: DeploymentInfo, failure: Failure) -> None:
        """Prices an attempt that failed once sent: its prompt, and after a 2xx head what was
        received (`cost.received`: nothing for a provider's error object without usage). A
        large body is read in a worker thread, the prompt's price standing meanwhile (kept if
        the request is cancelled while it reads)."""
        received = failure.received
        if failure.usage is not None:  # what the upstream reported (and its provider bills)
            size = len(received) if received is not None else failure.cut or 0
            self.settle_attempt(rec, dep, self.bounded(failure.usage, lambda: size, f"deployment {dep.name}"))
            return
        if (received is None and failure.cut is None) or not _ok(rec.status):
            self.settle_attempt(rec, dep, None)
            return
        most = self.most_output(dep)
        if received is None:  # a cut body is not parsed: priced by its size
            usage: Usage | None = cut_usage(self.prompt_tokens(), failure.cut or 0, most)
        elif len(received) < OFF_LOOP_BYTES:
            usage = received_usage(
                self.prompt_tokens(), received, self.decision.encoding, stream=self.stream, most=most
            )
        else:
            self.settle_attempt(rec, dep, None)
            price = partial(
                received_usage, self.prompt_tokens(), received, self.decision.encoding, stream=self.stream, most=most
            )
            usage = await self.loop.run_in_executor(COUNTING, price)
        if usage is None:
            rec.usage, rec.cost_usd = None, 0.0
        else:  # the usage a broken stream's head reported is the upstream's word too
            size = len(received) if received is not None else failure.cut or 0
            self.settle_attempt(rec, dep, usage if usage.estimated else self.bounded(usage, lambda: size, dep.name))

    def most_output(self, dep: DeploymentInfo) -> int:
        """The most output tokens the request could have had from `dep`: what an estimate of a
        failed answer never goes past. Its `max_tokens` a choice, else the bound its budgets
        reserve for it (`Reservations._completion`): a cut 128 MiB answer was priced as 33 M
        tokens ($268 for one 502, at each of four attempts), whatever the model can write."""
        d = self.decision
        cfg = self.live.config
        per_choice = d.max_tokens or max(cfg.budgets.reserve_max_tokens, unbounded_output(cfg, (dep.name,)))
        return per_choice * max(1, d.choices)

    def settle_attempt(self, rec: AttemptRecord, dep: DeploymentInfo, usage: Usage | None) -> None:
        """Fills in an attempt's usage (the upstream's, else the prompt alone) and its cost."""
        if usage is None:
            usage = Usage(prompt_tokens=self.prompt_tokens(), estimated=True)
        rec.usage = usage
        # At the prices in force when the request started, as it was routed, reserved and
        # baselined: priced as it ended, one across a window's edge took the other price.
        rec.cost_usd = cost_of(dep.price, usage, self.record.started)


async def _error_answer(resp: Response, adapter: Adapter, dep: DeploymentInfo) -> Failure:
    """An upstream's 4xx or 5xx, read up to `MAX_ERROR_BYTES` and classified by its adapter."""
    data, whole = await read_up_to(resp, MAX_ERROR_BYTES)
    cls = adapter.classify(resp.status, data, resp.headers)
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    if whole:
        msg = adapter.error_message(resp.status, data)
    else:  # the connection is dropped by the caller (it is not read to its end)
        mib = MAX_ERROR_BYTES >> 20
        msg = f"the upstream's error answer (HTTP {resp.status}) is larger than {mib} MiB"
    if cls is Outcome.AUTH_ERROR:
        # For the operator's log only: the client learns that our credentials failed.
        log.warning("deployment %s refused our credentials: %s", dep.name, redact.cut(msg, 300))
        msg = f"The provider refused edgeroute's credentials for this deployment (HTTP {resp.status})."
    if cls is Outcome.RATE_LIMITED and adapter.too_large(data):
        # This request's size, not the deployment's load: no cool-down for everyone (a Retry-After
        # of 300 s took the deployment out for five minutes), and not asked again.
        return Failure(cls, resp.status, msg, 0.0, data, again=False)
    return Failure(cls, resp.status, msg, retry_after, data)


def error_in_200(adapter: Adapter, obj: dict[str, Any], status: int, keys: Iterable[str]) -> Failure | None:
    """The failure of a 200 JSON answer that is an error object (`{"error": ...}`, Anthropic's
    `{"type": "error", "error": ...}`) without any of an answer's `keys`, else None. A client
    error in it (a proxy's `{"error": {"code": 400}}`) is the client's error, as its HTTP twin
    is (`in_band_failure`); as a server error it was retried everywhere and opened circuits."""
    if obj.get("error") and not any(k in obj for k in keys):
        return in_band_failure(adapter, obj["error"], status, None, "upstream answered 200 with an error")
    return None


def in_band_failure(adapter: Adapter, err: Any, status: int, received: bytes | None, what: str) -> Failure:
    """An error an upstream sent inside a 200 (a stream's error event, a JSON body that is an
    error), classified as its HTTP twin would be (`in_band_status`, the adapter's rules). A
    client error is not taken at its word: vLLM and SGLang label their own crashes `"code": 400`,
    and a sick replica then answered half the traffic with 400s, never failed over nor ejected.
    It fails over as a server error (`Failure.in_band`) whose health report waits: once a second
    deployment says the same, or none is left, the client gets the 4xx and no deployment's health
    is charged (as a server error it was asked of every deployment, answered 502, and opened
    their circuits for everyone); one another deployment answers is the first one's failure.
    Other classes keep the 200 they came with."""
    said = err.get("message") if isinstance(err, dict) else err
    body = orjson.dumps({"error": err}, default=str)
    cls = adapter.classify(in_band_status(err), body)
    msg = redact.cut(f"{what}: {said}", 500)
    if cls is Outcome.CONTEXT_WINDOW:  # a larger deployment may take it; never the deployment's health
        return Failure(cls, in_band_status(err), redact.cut(str(said), 500), received=received, body=body)
    if cls.about_request and cls is not Outcome.SUCCESS:
        said = redact.cut(str(said), 500)
        return Failure(
            Outcome.SERVER_ERROR, in_band_status(err), said, received=received, body=body, again=False, in_band=True
        )
    if cls is Outcome.AUTH_ERROR:  # never the provider's text (it can quote our key)
        log.warning("deployment of provider %s refused our credentials in a 200: %s", adapter.name, msg)
        msg = "The provider refused edgeroute's credentials for this deployment."
    return Failure(cls, status, msg, received=received, body=body)


def sound_usage(obj: dict[str, Any]) -> Literal["sound", "repaired", "absurd"]:
    """Whether an OpenAI-format answer's `usage` is one to show its client: "repaired" in place
    when only its total was absurd (`sse.repaired_usage`: sound counts, and the total they make);
    "absurd" when its counts are garbage too, for the caller to put the count it charges in their
    place (`openai_usage`). Relayed, a count no answer has (negative, 1e15) reached apps that
    bill their users from `usage`, and the cache replayed it."""
    reported = obj.get("usage")
    if not sse.absurd_usage(reported):
        return "sound"
    if (repaired := sse.repaired_usage(reported)) is None:
        return "absurd"
    obj["usage"] = repaired
    return "repaired"


def openai_usage(usage: Usage) -> dict[str, int]:
    """`usage` as an OpenAI answer's `usage` member."""
    total = usage.prompt_tokens + usage.completion_tokens
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": total}


def body_with_usage(got: JsonAnswer) -> bytes:
    """`got`'s body with the usage it is charged at where the upstream reported none: as the
    cache keeps it, so that a replay as a stream ends with the usage chunk its client asked for
    (OpenAI's always does). Parsed only when the body names no `usage` (a JSON string's quotes
    are escaped: only a key or a bare value is `"usage"`)."""
    if got.usage is None or b'"usage"' in got.body:
        return got.body
    obj = orjson.loads(got.body)
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return got.body
    obj["usage"] = openai_usage(got.usage)
    return orjson.dumps(obj)


def _too_large(status: int) -> Failure:
    """An answer over `MAX_ANSWER_BYTES`: the deployment would send it again (and be paid), so
    the request fails over rather than asking it again."""
    msg = f"the upstream's answer is larger than {MAX_ANSWER_BYTES // 2**20} MiB"
    return Failure(Outcome.SERVER_ERROR, status, msg, cut=MAX_ANSWER_BYTES, again=False)


def _text_chunks(completion: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """The chunks of a legacy completions stream that delivers `completion`: one a choice."""
    base = {k: completion[k] for k in ("id", "object", "created", "model") if k in completion}
    chunks = [
        base | {"choices": [{**c, "finish_reason": c.get("finish_reason") or "stop"}]} for c in completion["choices"]
    ]
    if include_usage and completion.get("usage") is not None:
        chunks.append(base | {"choices": [], "usage": completion["usage"]})
    return chunks


def _is_json(resp: Response) -> bool:
    """Whether an answer's head says JSON (not the event stream asked for)."""
    return resp.headers.get("Content-Type", "").partition(";")[0].strip().lower() == "application/json"


def _ok(status: int | None) -> bool:
    """Whether an upstream's head said the answer follows (a 2xx)."""
    return status is not None and 200 <= status < 300


def _failure_of(e: Exception, status: int | None, dep: DeploymentInfo) -> Failure:
    """What an attempt that raised `e` failed of; `status` the upstream's, if its head arrived.
    Called in the `except` block, so a logged traceback is `e`'s."""
    if isinstance(e, TimeoutError):  # before OSError, of which it is one
        if status is not None:
            return Failure(Outcome.TIMEOUT, status, "the upstream stalled while sending its answer")
        return Failure(Outcome.TIMEOUT, None, "no answer within the timeout")
    if isinstance(e, UpstreamTlsError):
        return Failure(Outcome.CONNECT_ERROR, None, f"TLS handshake failed: {e.reason}")
    if isinstance(e, UpstreamProtocolError):
        return Failure(Outcome.SERVER_ERROR, None, f"the upstream {e}")
    if isinstance(e, OSError) and _ok(status):  # answered 2xx, then broken mid-body: not a failed connection
        return Failure(Outcome.SERVER_ERROR, status, f"the upstream's answer broke off: {type(e).__name__}")
    if isinstance(e, OSError):  # UpstreamError is one
        return Failure(Outcome.CONNECT_ERROR, None, f"connection failed: {type(e).__name__}")
    if isinstance(e, sse.StreamProtocolError):
        # The upstream opened a stream event and never ended it, or sent one its client cannot
        # read: its failure (fails over).
        return Failure(Outcome.SERVER_ERROR, status, f"the upstream {e}")
    # An answer the adapter could not read (bad usage, a malformed event): the deployment's
    # fault, like a 5xx, so fail over; the core hears of it in `_report`.
    log.exception("unreadable answer from deployment %s", dep.name)
    return Failure(Outcome.SERVER_ERROR, status, f"upstream answer could not be read ({type(e).__name__})")


def _unreadable_choices(obj: dict[str, Any]) -> str | None:
    """What makes a chat answer unreadable to an OpenAI client, or None."""
    choices = obj.get("choices", _MISSING)
    if choices is _MISSING:
        return "has no choices"
    # A loop, not `all()` over a generator: run for every answer, the generator cost more than its test.
    if isinstance(choices, list):
        for c in choices:
            if not isinstance(c, dict) or not isinstance(c.get("message", _EMPTY), dict):
                break
        else:
            # No choice, or none with anything in it nor a finish: an empty "answer" the client's
            # `choices[0]` fails on (or reads as nothing), paid for, and never failed over.
            return None if any(map(_answered, choices)) else "has no answer (no choice with content or a finish)"
    return "has choices that are not objects with a message object"


def _answered(choice: dict[str, Any]) -> bool:
    """Whether a JSON answer's choice holds something or says it finished (an empty `stop` is an answer)."""
    if choice.get("finish_reason"):
        return True
    msg = choice.get("message") or _EMPTY
    return any(msg.get(k) for k in ("content", "tool_calls", "function_call", "refusal", "audio"))


_MISSING = object()
_EMPTY: dict[str, Any] = {}


_MALFORMED = object()


def _objects(events: list[bytes]) -> Iterator[Any]:
    """The JSON objects of a translated stream's events, in order, as they are asked for: None
    for `[DONE]`, `_MALFORMED` (and no more) for one that is not JSON; other JSON values, which
    carry neither content nor an error, are passed over."""
    for ev in events:
        data = sse.event_data(ev)
        if data is None:
            continue
        if data == b"[DONE]":
            yield None
            continue
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            yield _MALFORMED
            return
        if isinstance(obj, dict):
            yield obj


def has_content(obj: Any) -> bool:
    """Whether a chunk carries something a user would see (text, tool call, refusal, reasoning,
    finish). Reasoning (`reasoning_content`: DeepSeek, vLLM; `reasoning`: OpenRouter) commits
    the stream as Anthropic's thinking does: held, a model that thought past the first-byte
    timeout was timed out while it streamed, and failed over. Usage alone does not: a chunk of
    it before an error committed the stream, and the client got the error, not a failover."""
    if not isinstance(obj, dict):
        return False
    for choice in obj.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or delta.get("refusal") or delta.get("function_call"):
            return True
        if delta.get("reasoning_content") or delta.get("reasoning"):
            return True
        if choice.get("finish_reason"):
            return True
    return False
