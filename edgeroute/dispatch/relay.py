"""Relaying a committed upstream stream to the client, and settling its cost.

Once a stream has produced its first real content it is the request's answer: from
then on an upstream failure can only end the stream with an explicit error event, and
exactly one: an upstream's own error event (Anthropic's mid-stream `overloaded_error`)
ends the relay there, nothing after it sent and no error of ours added.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import StreamWriter

from edgeroute import sse
from edgeroute.accounting import OVERRAN, Usage
from edgeroute.cost import underreport
from edgeroute.cost.keys import end_watch
from edgeroute.dispatch import attempt, senders
from edgeroute.dispatch.attempt import COUNTING, OFF_LOOP_BYTES, Attempts, StreamAnswer
from edgeroute.dispatch.deadline import Deadline
from edgeroute.dispatch.output_cap import OutputCap, output_limit
from edgeroute.dispatch.transcript import Transcript
from edgeroute.outcome import Outcome
from edgeroute.providers.base import in_band_status
from edgeroute.ready_response import bind, write_head
from edgeroute.state import STATE
from edgeroute.upstream import DeploymentInfo

log = logging.getLogger("edgeroute.dispatch")

_SLOW_CLIENT_BYTES = 16 * 1024  # unsent bytes to a client above which its stream's idle timer stops
# Upstream pieces already arrived are relayed together up to this: one write (a system call, and a
# wake-up of the client) a burst rather than an event. Under the slow-client mark: a burst is no stall.
_BURST_BYTES = 8 * 1024
_DRAIN_BYTES = 0x10000  # bytes written between waits for a slow client's buffer (aiohttp's `write` LIMIT)


# Set on a request once its stream response is prepared: from then on an error can only end
# the stream (an error event), never become a second response (the server's front_middleware checks it).
STREAM_STARTED = web.RequestKey("stream_started", bool)


def _through_error(data: bytes) -> tuple[bytes, Any]:
    """`data` (whole events that `sse.has_error_key` flags) up to and including the first error
    event, and its `error` (None without one): an OpenAI chunk `{"error": ...}`, an Anthropic or
    Responses event of type `error`. Such an event ends the stream: what an upstream sends after it is no
    part of the answer, and an error of ours after it was a second one for the client (the
    Anthropic SDK's `overloaded_error` then "ended the stream early")."""
    events, _ = sse.split_events(data)  # what is left over (a piece of an overlong event) follows any error
    for i, ev in enumerate(events):
        payload = sse.event_data(ev)
        if not payload or not sse.has_error_key(payload):
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if sse.is_error_event(obj):
            return b"".join(e + b"\n\n" for e in events[: i + 1]), obj.get("error") or {}
    return data, None


_DONE_EVENT = sse.DONE + b"\n\n"


def _whole_without_done(translator: Any, said: Transcript, call: Attempts) -> bool:
    """Whether a chat stream that ended without `[DONE]` is a whole answer all the same: every
    choice finished, and its usage came if the client asked for it (what edgeroute asked for
    unasked, a server that ignores `stream_options` never sends: the answer is counted).
    Some OpenAI-compatible servers never send `[DONE]`: their every answer got an error event
    appended after its end (the OpenAI SDK raised it) and was never cached."""
    while translator is not None and getattr(translator, "answered", None) is None:
        translator = getattr(translator, "inner", None)  # (one that wraps it: `StreamAudio`)
    if translator is None or not translator.answered():
        return False
    return not call.decision.include_usage or sse.find_usage(said.tail()) is not None


async def relay_stream(
    request: web.Request,
    answer: StreamAnswer,
    response_headers: dict[str, str],
    idle_timeout: float,
    call: Attempts,
    dep: DeploymentInfo,
    encode: Callable[[bytes], bytes] | None = None,
    on_complete: Callable[[bytes], None] | None = None,
) -> web.StreamResponse:
    """Sends the held head, then the upstream's chunks as they arrive, never held back for
    more (those that had arrived together go in one write).

    `encode` turns the OpenAI-format events (including the error events written here)
    into another API's stream format, e.g. Anthropic's for `/v1/messages`. The stream
    ends by the request's total timeout at the latest.
    """
    # What the stream said is kept so that a stream that ends without usage, by design or cut
    # short, is still costed for what it produced: in bounded memory (see transcript.py).
    head, completed = sse.through_done(answer.head)
    said = Transcript(head, keep_whole=on_complete is not None)
    translator = answer.translator
    loop = call.loop  # kept by the call: asking for it again is a getpid() system call
    failure: tuple[str, str] | None = None
    upstream_broke = False
    upstream_error = False  # the upstream's own error event was relayed: the stream ends there
    server = request.app[STATE]
    timer: Deadline | None = None
    out = _EventStream(response_headers)
    # An upstream that ignores the request's completion bound is stopped (see output_cap.py).
    limit = output_limit(call.decision.max_tokens, call.decision.choices)
    if limit is not None:
        limit += call.output_allowance()
    cap = OutputCap(limit, call.decision.encoding) if limit is not None else None
    overran = False
    withheld = b""  # the events that would have taken the stream past its limit: not sent, still priced
    # A managed key revoked or expired mid-stream: cut at the next events, or at once if the
    # upstream is silent then (`wake` fires the stream's timer).
    wake = _Wake(loop)
    key_ended = end_watch(request, wake)
    try:
        writer = await out.prepare(request)
        request[STREAM_STARTED] = True
        events = _Events(out, encode, strip_usage=call.usage_added)
        sendable = events.sendable  # bound once: called for every chunk
        call.record.ttft_ms = (time.time() - call.record.started) * 1000
        writing_slowly = False  # a write waits for a client that reads slowly
        try:
            upstream_error = await events.send(head)
            # The head went with the first events, unless the guard held all of them. (An aiohttp
            # that buffers no head, without `send_headers`, sent it in `prepare`.)
            if (send_head := getattr(writer, "send_headers", None)) is not None:
                send_head()
            # A head past the limit has gone (the client needs its first events to read any end),
            # but nothing more does: one event of 40,000 tokens for `max_tokens: 5` went on unread.
            overran = cap is not None and not completed and cap.add(head) and await cap.past()
            # One timer for the whole stream: the idle timeout, capped by the total deadline.
            # Moving it costs a timer-heap operation, so it is moved at most once per `slack`,
            # to `idle_timeout + slack` from then: a stall is reported after between 1 and 1.1
            # idle timeouts of silence. It stops while a slow client is written to (a slow
            # reader is not an upstream stall).
            slack = idle_timeout / 10
            send_timeout = server.live.config.server.send_timeout
            armed = loop.time()
            transport = request.transport
            # On the loop's shared deadline timer, as an attempt's (asyncio.timeout_at asked for the
            # running loop three times, each a getpid(), and made a uvloop timer of its own).
            with Deadline(loop, min(armed + idle_timeout + slack, call.deadline, server.drain_at)) as idle:
                timer = idle
                wake.arm(idle)
                server.streams.add(idle)  # a drain moves it (see ServerState.begin_drain)
                while not completed and not upstream_error and not overran:
                    chunk = await answer.resp.read_arrived(_BURST_BYTES)
                    if not chunk and _whole_without_done(translator, said, call):
                        upstream_error = await events.send(_DONE_EVENT)  # as the client's SDK expects
                        said.add(_DONE_EVENT)
                        completed = True
                        break
                    if not chunk:
                        upstream_broke = True
                        failure = (
                            "The upstream ended the stream early; the answer is incomplete.",
                            "stream_incomplete",
                        )
                        break
                    if translator is not None:
                        # Whole events: cut after [DONE], what an upstream sends past its end goes nowhere.
                        chunk, completed = sse.through_done(translator.feed(chunk))
                    else:  # raw reads (no adapter relays so): [DONE] may straddle two
                        completed = sse.through_done(said.tail(len(sse.DONE) + 1) + chunk)[1]
                    if chunk:
                        if key_ended is not None and (failure := key_ended()) is not None:
                            withheld, completed = chunk, False  # not sent, still priced
                            break
                        # Measured before it is sent: events read together (up to `_BURST_BYTES`)
                        # went out whole before the look that found them past the limit.
                        if cap is not None and cap.add(chunk) and await cap.past():
                            overran, withheld = True, chunk
                            completed = False  # cut: not a whole answer for the cache or the log
                            break
                        # A write waits for the client only once its transport holds more than
                        # its high-water mark (64 KiB by default): stop the timer well before.
                        if (
                            transport is not None
                            and transport.get_write_buffer_size() + len(chunk) > _SLOW_CLIENT_BYTES
                        ):
                            # A client that reads nothing for `server.send_timeout` is let go: it
                            # held the upstream connection (and a capacity slot) for the total timeout.
                            idle.reschedule(min(loop.time() + send_timeout, call.deadline, server.drain_at))
                            armed = -math.inf
                            writing_slowly = True
                        # `events.send`, inline: no coroutine an event, only a wait for a slow client
                        data, upstream_error = sendable(chunk)
                        if data and ((pending := out.put(data)) < 0 or pending > _DRAIN_BYTES):
                            await (out.write(data) if pending < 0 else out.drained())
                        writing_slowly = False
                        said.add(chunk)
                        # Bounded as a non-streamed answer is.
                        if said.size > attempt.MAX_ANSWER_BYTES and not completed:
                            upstream_broke = True
                            mib = attempt.MAX_ANSWER_BYTES >> 20
                            failure = (f"The upstream's answer passed {mib} MiB; it is incomplete.", "answer_too_large")
                            break
                    now = loop.time()
                    if now - armed > slack:
                        armed = now
                        idle.reschedule(min(now + idle_timeout + slack, call.deadline, server.drain_at))
        except Exception as e:
            # Woken by its key's end (the upstream silent, or a write waiting): no one's fault.
            keys_end = key_ended.why() if wake.woken and key_ended is not None and isinstance(e, TimeoutError) else None
            if (
                writing_slowly
                and keys_end is None
                and isinstance(e, TimeoutError)
                and loop.time() < min(call.deadline, server.drain_at)
            ):
                # The client read nothing for `send_timeout`: nothing more can reach it, and the
                # upstream is not at fault. Its connection is dropped; what it was sent is priced.
                call.record.outcome, call.record.error_class = "client_gone", "slow_client"
                if request.transport is not None:
                    request.transport.abort()
                raise ConnectionResetError("the client read nothing for server.send_timeout") from None
            if isinstance(e, OSError) and not isinstance(e, TimeoutError):  # UpstreamError, or a failed write
                transport = request.transport
                if transport is None or transport.is_closing():
                    # The client went away (its socket failed a write): nothing to tell it.
                    call.record.outcome = "client_gone"
                    raise
            if keys_end is not None:
                failure = keys_end
            else:
                failure, broke = _failure_of(e, loop, call.deadline, server.drain_at, dep)
                upstream_broke = upstream_broke or broke
        if overran:
            assert cap is not None
            failure = await _overran(call, dep, cap, said.tail(), events, translator)  # ended after what was sent
        if withheld:
            said.add(withheld)  # its usage, or its text, is what the upstream bills
        if failure is not None:
            await events.error(failure)
            # Cut by the drain's end, as a request still waiting then is (`Call.run_until_drain`).
            call.record.outcome = "drain_cut" if failure[1] == "server_shutdown" else "stream_interrupted"
            call.record.error_class = failure[1]
        elif upstream_error:  # told the client already, in the upstream's words
            call.record.outcome = "stream_interrupted"
            call.record.error_class, upstream_broke = _relayed_error(call, dep, translator, events.upstream_error)
        else:
            await events.flush()
            if (cut := events.cut()) is not None:
                # The client's format ended it as cut (an Anthropic client's chat answer without
                # its finish_reason before `[DONE]`): recorded and blamed as any cut stream.
                upstream_broke, completed = True, False
                call.record.outcome, call.record.error_class = "stream_interrupted", cut
        if answer.before_end is not None:  # what the stream gave the caller, recorded before its end
            await answer.before_end()
        await out.write_eof()
    finally:
        if key_ended is not None:
            key_ended.close()
        if timer is not None:
            server.streams.discard(timer)
        if answer.slot is not None:
            call.live.capacity.release(answer.slot)
            answer.slot = None
        if completed and failure is None and not upstream_error:
            answer.resp.release()  # what may follow [DONE] is the stream's end: keep the connection
        else:
            answer.resp.close()
        if upstream_broke:
            senders.ejected(dep.name, call.router.report_broken_stream(dep.index, call.sender))
        await _settle(call, dep, answer, said)
        if on_complete is not None and completed and failure is None and not upstream_error:
            # The whole answer, as OpenAI-format events (for the cache, the request log, a
            # shadow): one past `transcript.WHOLE_BYTES` is too large for any of them.
            if (whole := said.stream()) is not None:
                on_complete(whole)
            else:
                log.info("a streamed answer of %d bytes was not offered to the cache, log or shadow", said.size)
    return out


class _Wake:
    """Ends a relay's wait when its managed key is seen ended: the stream's own timer fires now.
    A silent upstream (a model thinking between chunks) kept a revoked key's stream open until
    its next events; this costs nothing a chunk (no task, no second future awaited)."""

    __slots__ = ("_deadline", "_loop", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deadline: Deadline | None = None
        self.woken = False

    def arm(self, deadline: Deadline) -> None:
        """The stream's timer, once it runs (a key that ended before fires it at once)."""
        self._deadline = deadline
        if self.woken:
            self()

    def __call__(self) -> None:
        self.woken = True
        if self._deadline is not None:
            try:
                self._deadline.reschedule(self._loop.time())
            except RuntimeError:  # expired or left already: the stream is ending anyway
                pass


class _EventStream(web.StreamResponse):
    """The stream's response: its head goes out with its first events, in one write. Sent
    apart, as aiohttp sends a stream's head, it cost the first token a system call and a
    wake-up of the client that read it (one more TCP segment, the same bytes).

    Its head is made as `ReadyResponse` makes a cache hit's, without aiohttp's general
    `prepare` (cookies, compression, bodies that must be empty, a Content-Type parsed and
    made again): all of it ran between the upstream's first content and the client's.
    `headers` is taken, not copied."""

    _send_headers_immediately = False
    # The writer, once its head went, when nothing but chunking stands between an event and the
    # socket (no compression, length or callbacks): `write` frames the chunk itself.
    _plain: StreamWriter | None = None

    def __init__(self, headers: dict[str, str]) -> None:
        headers[hdrs.CONTENT_TYPE] = "text/event-stream"
        headers[hdrs.CACHE_CONTROL] = "no-cache"
        super().__init__(status=200, headers=headers)

    def put(self, data: bytes) -> int:
        """Writes `data` as one chunk, as aiohttp's `write` would put it on the wire (its size
        line, the chunk and its CRLF), in one transport write: the bytes written since the last
        wait for the client (past `_DRAIN_BYTES`, await `drained`); -1 if not written (await
        `write`: the head has not gone yet, or aiohttp's writer does more than chunk). aiohttp's
        path (three coroutines deep, the chunk framed in three pieces and joined) cost each
        relayed event a few thousand instructions more."""
        writer = self._plain
        if writer is None or self._eof_sent:
            return -1
        transport = writer._protocol.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        framed = b"%x\r\n%b\r\n" % (len(data), data)
        writer.buffer_size += len(framed)
        writer.output_size += len(framed)
        transport.write(framed)
        return writer.buffer_size

    async def drained(self) -> None:
        """Waits, as aiohttp's `write` does every 64 KiB, until a slow client's buffer has room."""
        writer = self._payload_writer
        assert writer is not None
        writer.buffer_size = 0
        await writer.drain()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """aiohttp's `write`; by `put` once the head went (the same bytes on the wire)."""
        if type(data) is not bytes or (pending := self.put(data)) < 0:
            await super().write(data)
            if self._plain is None:
                self._plain = _plain_writer(self._payload_writer)
        elif pending > _DRAIN_BYTES:
            await self.drained()

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        writer, keep_alive = bind(self, request)
        if request.version >= HttpVersion11:
            writer.enable_chunking()
            self._headers[hdrs.TRANSFER_ENCODING] = "chunked"
        else:
            # HTTP/1.0: the stream ends with the connection, as aiohttp has it; stored (as
            # aiohttp's `_start` stores it) so the connection closes after it, not kept for a
            # next answer the client would read as more of this body.
            keep_alive = self._keep_alive = False
        await write_head(self, request, writer, keep_alive)
        return writer


def _plain_writer(writer: AbstractStreamWriter | None) -> StreamWriter | None:
    """`writer`, if it is aiohttp's, its head written, chunking and doing nothing else to a chunk."""
    if (
        type(writer) is StreamWriter
        and writer.chunked
        and getattr(writer, "_headers_written", False)
        and getattr(writer, "_headers_buf", None) is None
        and writer._compress is None
        and writer.length is None
        and getattr(writer, "_on_chunk_sent", None) is None
        and getattr(writer, "on_body_write", None) is None
    ):
        return writer
    return None


class _Events:
    """What a relay writes to its client: whole events only, in the client's format.

    An upstream's error event relayed mid-stream may quote our key: whole events only go on,
    redacted whole (a key split over two reads escaped redaction read by read). `encode`
    turns OpenAI-format events into another API's (Anthropic's for `/v1/messages`).
    """

    __slots__ = ("_encode", "_guard", "_out", "_strip_usage", "upstream_error")

    def __init__(self, out: _EventStream, encode: Callable[[bytes], bytes] | None, strip_usage: bool = False) -> None:
        self._out = out
        self._encode = encode
        self._guard = sse.RelayGuard()
        # The usage chunk edgeroute asked for and the client did not: kept from it.
        self._strip_usage = strip_usage
        self.upstream_error: Any = None  # the `error` of the upstream's own error event, once relayed

    def sendable(self, data: bytes) -> tuple[bytes, bool]:
        """What may go of `data`, in the client's format, and whether it ends with the upstream's
        own error event."""
        guard = self._guard
        data = guard.feed(data)
        ended = False
        if guard.error_key:  # the common chunk was searched once, by the guard
            data, err = _through_error(data)
            if err is not None:
                ended, self.upstream_error = True, err
        if self._strip_usage:
            data = sse.without_usage_chunks(data)
        return (self._encode(data) if self._encode is not None else data), ended

    async def send(self, data: bytes) -> bool:
        """Sends what may go of `data`; True once the upstream's own error event has gone."""
        data, ended = self.sendable(data)
        if data:
            out = self._out
            if (pending := out.put(data)) < 0:  # before the head went (see `_EventStream.put`)
                await out.write(data)
            elif pending > _DRAIN_BYTES:
                await out.drained()
        return ended

    async def error(self, failure: tuple[str, str]) -> None:
        """Ends the stream's events with our error event (message, error class), dropping
        whatever unfinished event was held back."""
        self._guard.drop()
        await self.send(sse.error_event(*failure))

    async def end(self, events: bytes) -> None:
        """Ends the stream with `events` of ours (whole), dropping whatever unfinished event was held back."""
        self._guard.drop()
        await self.send(events)

    def cut(self) -> str | None:
        """Why the client's encoder ended as cut a stream the upstream ended cleanly (an error
        class; the error event has gone), else None."""
        cut: str | None = getattr(self._encode, "cut", None)
        return cut

    async def flush(self) -> None:
        """Sends the stream's last event, held back for want of its blank line."""
        if rest := self._guard.close():
            if self._strip_usage:
                rest = sse.without_usage_chunks(rest)
            rest = self._encode(rest) if self._encode is not None else rest
            if rest:
                await self._out.write(rest)


async def _overran(
    call: Attempts, dep: DeploymentInfo, cap: OutputCap, tail: bytes, events: _Events, translator: Any
) -> tuple[str, str] | None:
    """Ends a stream whose upstream sent past its bound: in the client's format, as an answer
    stopped at its length (a Responses stream's by its translator, which kept its output; an error
    event where the format has no such end), the upstream's connection closed by the caller. The
    operator sees it in the log and the request's outcome."""
    log.warning(
        "deployment %s streamed %d output tokens past max_tokens %s x %d: stopped at edgeroute's limit of %d",
        dep.name,
        cap.tokens,
        call.decision.max_tokens,
        call.decision.choices,
        cap.limit,
    )
    call.record.outcome, call.record.error_class = "stream_interrupted", OVERRAN
    end = cap.end(tail, call.prompt_tokens() if call.decision.include_usage else None)
    if end is None and (length_end := getattr(translator, "length_end", None)) is not None:
        end = length_end(call.prompt_tokens(), cap.tokens, tail)
    if end is None:
        return ("The upstream sent more than the request's max_output_tokens; the answer was stopped.", OVERRAN)
    await events.end(end)
    return None


def _failure_of(
    e: Exception, loop: asyncio.AbstractEventLoop, deadline: float, drain_at: float, dep: DeploymentInfo
) -> tuple[tuple[str, str], bool]:
    """The error event (message, error class) that ends a stream broken by `e`, and whether the
    upstream is to blame (the core hears of it). Called in the `except` block, so a logged
    traceback is `e`'s."""
    if isinstance(e, TimeoutError):  # before OSError, of which it is one
        if loop.time() >= drain_at:
            return ("The server is shutting down; the answer is incomplete.", "server_shutdown"), False
        if loop.time() >= deadline:
            msg = "The answer took longer than the request's total timeout; it is incomplete."
            return (msg, "stream_timeout"), False
        return ("The upstream stalled mid-stream; the answer is incomplete.", "stream_timeout"), True
    if isinstance(e, sse.StreamProtocolError):
        # An event opened and never ended (held whole, or by a translator), or one its client
        # cannot read: the upstream's protocol error; what was held is dropped, never relayed.
        return (f"The upstream {e}; the answer is incomplete.", "upstream_protocol_error"), True
    if isinstance(e, OSError):
        return ("The upstream connection broke mid-stream; the answer is incomplete.", "stream_interrupted"), True
    log.exception("unreadable stream from deployment %s", dep.name)
    return (
        "The upstream sent a stream edgeroute could not read; the answer is incomplete.",
        "stream_interrupted",
    ), True


async def _settle(call: Attempts, dep: DeploymentInfo, answer: StreamAnswer, said: Transcript) -> None:
    """Costs the stream's attempt: by the usage its last events carried, else counted from its text."""
    translator = answer.translator
    if answer.usage is not None:  # a whole JSON answer's, served as a stream
        size = said.size  # the stream of the answer bounds its text
        whole = call.bounded(answer.usage, lambda: size, f"deployment {dep.name}")
        if answer.rec is not None:
            call.settle_attempt(answer.rec, dep, whole)
        if whole is answer.usage:  # a capped one was told of already
            call.check_overrun(dep, whole)
        answer.usage = whole
        return
    usage = Usage.from_openai(
        sse.find_usage(said.tail()) or (translator.usage if translator is not None else None), answered=True
    )
    if usage is None:
        rec = answer.rec
        seen = _tool_calls_seen(translator)

        def settle(u: Usage) -> None:
            u.tool_calls = seen  # built-in tool calls run before the cut: billed all the same
            if rec is not None:
                call.settle_attempt(rec, dep, u)

        usage = await _estimate(call, said, settle, _prompt_reported(translator))
        usage.tool_calls = seen
    elif said.size > usage.completion_tokens * _EVENT_BYTES_PER_TOKEN + _EVENT_SLACK_BYTES:

        def settle_counted(u: Usage) -> None:
            if answer.rec is not None:
                call.settle_attempt(answer.rec, dep, u)

        usage = await _underreported(call, dep, usage, said, settle_counted)
    if not usage.estimated:  # the upstream's own count: no more than the request could be billed
        usage = call.bounded(usage, lambda: _text_bytes(said), f"deployment {dep.name}")
    if answer.rec is not None:
        call.settle_attempt(answer.rec, dep, usage)
    if call.record.error_class != OVERRAN:  # whole, yet past the bound (one event, ended at once)
        call.check_overrun(dep, usage)


def _text_bytes(said: Transcript) -> int:
    """The UTF-8 bytes of what a stream said (its text, tool calls, reasoning): no token is shorter."""
    return len(said.text().encode("utf-8", "surrogatepass"))


# A stream's bytes a reported output token may come with before its text is read and checked
# (`cost.underreport`): an event is ~200 bytes for a token or two, with `logprobs` a few KiB.
# Past it (an upstream that reported 5 tokens for 4,000), the text is counted.
_EVENT_BYTES_PER_TOKEN = 1024
_EVENT_SLACK_BYTES = 8192


async def _underreported(
    call: Attempts, dep: DeploymentInfo, usage: Usage, said: Transcript, settle_cancelled: Callable[[Usage], None]
) -> Usage:
    """The usage to charge a stream whose reported output may be fewer tokens than its text.
    A long text is counted in a worker thread after the stream's end went out; a client that
    closes then cancels the handler, and the answer is still priced (`settle_cancelled`, as
    `_estimate` does): it was recorded with no usage at all, free."""
    encoding = call.decision.encoding

    def check() -> underreport.Corrected | None:
        return underreport.check(usage, said.text(), encoding)

    if said.size < OFF_LOOP_BYTES:
        return call.charged(usage, check(), f"deployment {dep.name}")
    checking = asyncio.get_running_loop().run_in_executor(COUNTING, check)
    try:
        fix = await asyncio.shield(checking)
    except asyncio.CancelledError:
        try:
            fix = await asyncio.shield(checking)
        except asyncio.CancelledError:
            fix = None  # a shutdown that stops waiting: what the upstream reported
        settle_cancelled(call.charged(usage, fix, f"deployment {dep.name}"))
        raise
    return call.charged(usage, fix, f"deployment {dep.name}")


def _relayed_error(call: Attempts, dep: DeploymentInfo, translator: Any, err: Any) -> tuple[str, bool]:
    """The error class of a stream its upstream's own error event ended after content (relayed
    as it was), and whether the deployment's health is charged a broken stream. Read as the
    event's HTTP twin would be (`in_band_status`, the adapter's rules): a rate limit cools the
    deployment down as a 429 does; the request's own error (invalid, too long a context) is not
    the deployment's; anything else (overloaded, a server error) is a broken stream. A splice
    is cut for the answer's sake, not the deployment's health: honest streams the check misread
    (a server's own ids) would have taken it out for everyone."""
    if err is None or _cut_for_a_splice(translator):
        return "upstream_error", err is None
    status = in_band_status(err)
    outcome = call.live.upstreams[dep.provider].adapter.classify(status, orjson.dumps({"error": err}, default=str))
    if status == 429 and outcome is Outcome.RATE_LIMITED:
        call.router.begin(dep.index, call.sender)  # `report` ends an attempt: paired with a start
        call.report_health(dep.index, outcome, 0.0)
        return outcome.value, False
    if outcome.about_request:
        return outcome.value, False
    return "upstream_error", True


def _cut_for_a_splice(translator: Any) -> bool:
    """Whether a relayed stream ended on a second answer spliced in: a chat chunk of another
    completion (`sse.ChatChunks.ended`), a second message start in a stream translated
    from Anthropic's or Bedrock's (`ChunkWriter.cut_for_splice`), or a second response in a
    Responses stream relayed as it is (`responses_stream.NativeStream.cut_for_splice`)."""
    while translator is not None:
        if isinstance(translator, sse.ChatChunks):
            return translator.ended
        if getattr(translator, "cut_for_splice", False) or getattr(
            getattr(translator, "out", None), "cut_for_splice", False
        ):
            return True
        translator = getattr(translator, "inner", None)
    return False


def _tool_calls_seen(translator: Any) -> dict[str, int]:
    """The built-in tool calls a native stream showed before it was cut (it carried no final usage)."""
    while translator is not None:
        if (got := getattr(translator, "tool_calls_seen", None)) is not None:
            return dict(got)
        translator = getattr(translator, "inner", None)
    return {}


def _prompt_reported(translator: Any) -> Usage | None:
    """The prompt's counts a provider reported before its answer's end (Anthropic's
    message_start: cache reads and writes apart), from the translator or the one it wraps."""
    while translator is not None:
        if (got := getattr(translator, "prompt_usage", None)) is not None:
            return Usage.from_openai(got)
        translator = getattr(translator, "inner", None)
    return None


async def _estimate(
    call: Attempts, said: Transcript, settle_cancelled: Callable[[Usage], None], prompt: Usage | None = None
) -> Usage:
    """The usage of a stream that carried none, counted from its text, with the prompt's counts
    its provider reported (`prompt`: cache reads priced as such), else the prompt counted too
    (when the decision only estimated it); in a worker thread past `OFF_LOOP_BYTES` (the count of a
    hostile piece takes ~300 ns a byte: 16 KiB, 5 ms of the event loop).

    A client that closes as the stream ends cancels its handler while this counts: the answer
    is still priced (`settle_cancelled`, then the cancellation goes on), with the thread's
    count, or one made here if cancelled once more (a shutdown that stops waiting)."""
    encoding = call.decision.encoding
    loop = asyncio.get_running_loop()

    def count() -> Usage:
        if prompt is None:
            return said.usage(call.prompt_tokens(), encoding)
        u = said.usage(prompt.prompt_tokens, encoding)
        u.cached_tokens, u.cache_write_tokens = prompt.cached_tokens, prompt.cache_write_tokens
        u.cache_write_1h_tokens = prompt.cache_write_1h_tokens
        return u

    counting: asyncio.Future[Usage] | None = None
    try:
        if prompt is None:
            await call.counted_prompt()
        if said.size < OFF_LOOP_BYTES:
            return count()
        counting = loop.run_in_executor(COUNTING, count)
        return await asyncio.shield(counting)
    except asyncio.CancelledError:
        try:
            usage = await asyncio.shield(counting if counting is not None else loop.run_in_executor(COUNTING, count))
        except asyncio.CancelledError:
            usage = count()  # the prompt's estimate if its count is not in
        settle_cancelled(usage)
        raise
