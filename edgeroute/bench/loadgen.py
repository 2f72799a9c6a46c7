"""The load generator: open-loop (constant arrival rate) and closed-loop, on uvloop.

Open loop: request *i* is due at ``start + i / rate`` whatever happened before, and
its latency is measured from that intended time, not from when it was actually sent.
A stalled server (or a stalled generator) therefore shows up in the percentiles of
every request that should have been sent during the stall; this is what keeps the
numbers free of coordinated omission. Closed loop: N workers send back to back; it
measures maximum throughput, and its latencies are service times only.

Every run is bounded both in requests and in seconds; requests still in flight after
the grace period are cancelled and counted as timeouts. Latencies go into
HdrHistograms in microseconds (1 µs to 1 h, 3 significant digits).

The HTTP client is aiohttp for https:// targets and, by default, the minimal client
of :mod:`edgeroute.bench.http1` for plain http:// ones: on a 2-core machine that shares a core
with the mocks, aiohttp's client saturated before the proxy did.

With several targets (``--url`` given twice, or the overhead scenario's direct and
proxied paths) every arrival slot sends to each target with the same intended time,
and each target has its own :class:`Stats`: they see the same generator, the same
moment and the same noise, which cancel out of "proxy minus direct".
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
from hdrh.histogram import HdrHistogram

from edgeroute.bench.http1 import ClientPool

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)
_HIGHEST_US = 3_600_000_000


T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine on a fresh uvloop event loop (asyncio's when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, _HIGHEST_US, 3)


@dataclass(slots=True)
class Target:
    """An OpenAI-compatible endpoint (`url` is the base URL, e.g. http://127.0.0.1:8080/v1)."""

    name: str
    url: str
    model: str = "gpt-4o-mini"
    api_key: str = "bench"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def chat_url(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


@dataclass(slots=True)
class Stats:
    """What one target's requests did. Histograms hold microseconds."""

    name: str
    total: HdrHistogram = field(default_factory=new_histogram)  # intended send -> last byte
    headers: HdrHistogram = field(default_factory=new_histogram)  # intended send -> response headers
    ttft: HdrHistogram = field(default_factory=new_histogram)  # intended send -> first content token
    gaps: HdrHistogram = field(default_factory=new_histogram)  # between stream reads
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    events: int = 0  # SSE events received
    reads: int = 0  # socket reads that carried them (reads < events means chunks were merged)
    late_sends: int = 0  # sent more than 2 ms after their intended time (generator could not keep up)
    elapsed_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        def pct(h: HdrHistogram) -> dict[str, float] | None:
            if h.get_total_count() == 0:
                return None
            out = {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
            out["max"] = h.get_max_value() / 1000
            out["mean"] = h.get_mean_value() / 1000
            return out

        return {
            "name": self.name,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "errors": dict(self.errors),
            "rps": round(self.rps, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "late_sends": self.late_sends,
            "latency_ms": pct(self.total),
            "headers_ms": pct(self.headers),
            "ttft_ms": pct(self.ttft),
            "chunk_gap_ms": pct(self.gaps),
            "events": self.events,
            "reads": self.reads,
        }


@dataclass(slots=True)
class Load:
    """How much load: at most `requests` requests and at most `duration` seconds, whichever ends first."""

    requests: int = 1000
    duration: float = 10.0
    rate: float | None = 100.0  # arrivals per second per target (open loop); None: closed loop
    concurrency: int = 32  # closed-loop workers per target
    grace: float = 10.0  # after the last send, how long in-flight requests may take
    max_in_flight: int = 20_000
    warmup: int = 0  # requests per target sent first and not recorded
    connections: int = 256  # per target (raw client; 0: a new connection whenever none is idle)


# -- request bodies --------------------------------------------------------------

_LOREM = (
    "the system shall route each request to the cheapest deployment that satisfies its latency objective "
    "while keeping personal data within the region where it was collected and reporting every decision "
    "with enough detail for an operator to audit it later on when something goes wrong in production "
).split()


def chat_body(model: str, prompt_tokens: int = 32, stream: bool = False, seed: int = 0) -> bytes:
    """A realistic chat body: a system prompt, some history and a user turn, ~`prompt_tokens` tokens."""
    words = max(4, int(prompt_tokens * 0.75))
    text = [_LOREM[(seed + i * 7) % len(_LOREM)] for i in range(words)]
    third = max(1, words // 3)
    messages = [
        {"role": "system", "content": "You are a careful assistant. " + " ".join(text[:third])},
        {"role": "user", "content": " ".join(text[third : 2 * third])},
        {"role": "assistant", "content": "Understood. Could you say more about the constraints?"},
        {"role": "user", "content": " ".join(text[2 * third :]) + " Summarise the design in three bullets."},
    ]
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0.2, "max_tokens": 256}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


# The end of chat_body's last user turn, where `numbered` writes a request's number.
LAST_TURN_END = b' Summarise the design in three bullets."'


def numbered(body: bytes, n: int) -> bytes:
    """`body` (a chat_body) with `n` in its last user turn: a prompt no other request sends.
    The proxy remembers what its rules found in prompts seen lately (a cache hit's, by design),
    so a bench cycling through a few bodies would measure that memory, not real traffic."""
    i = body.rfind(LAST_TURN_END)
    if i < 0:
        return body
    return b"%s (request %d)%s" % (body[:i], n, body[i:])


# -- one request -------------------------------------------------------------------


def _has_token(chunk: bytes) -> bool:
    i = chunk.find(b'"content":"')
    while i >= 0:
        if chunk[i + 11 : i + 12] != b'"':
            return True
        i = chunk.find(b'"content":"', i + 11)
    return False


class StreamProbe:
    """What one streamed answer looked like on the wire: first token, gaps between reads,
    SSE events per read, and whether it ended with `[DONE]` or an error event."""

    def __init__(self, t_head: float) -> None:
        self.first: float | None = None
        self.last = t_head
        self.events = self.reads = 0
        self.done = self.errored = False
        self.gaps: list[int] = []

    def on_chunk(self, chunk: bytes) -> None:
        now = time.perf_counter()
        self.reads += 1
        if self.reads > 1:
            self.gaps.append(max(1, int((now - self.last) * 1e6)))
        self.last = now
        self.events += chunk.count(b"data:")
        if self.first is None and _has_token(chunk):
            self.first = now
        if b'{"error"' in chunk:
            self.errored = True
        if b"data: [DONE]" in chunk:
            self.done = True

    def record(self, st: Stats, intended: float) -> bool:
        """Adds the stream's figures to `st`; False (an error recorded) if it did not complete."""
        st.events += self.events
        st.reads += self.reads
        if self.errored or not self.done:
            st.error("stream_error_event" if self.errored else "stream_incomplete")
            return False
        if self.first is not None:
            st.ttft.record_value(max(1, int((self.first - intended) * 1e6)))
        for g in self.gaps:
            st.gaps.record_value(g)
        return True


async def send_one(
    session: aiohttp.ClientSession, target: Target, body: bytes, stream: bool, intended: float, st: Stats | None
) -> None:
    """Sends one request; records into `st` (None during warm-up) relative to `intended` (perf_counter)."""
    hdrs = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json", **target.headers}
    try:
        async with session.post(target.chat_url, data=body, headers=hdrs) as r:
            t_head = time.perf_counter()
            if r.status != 200:
                await r.read()
                if st is not None:
                    st.error(f"http_{r.status}")
                return
            if not stream:
                await r.read()
                t_end = time.perf_counter()
                if st is not None:
                    st.ok += 1
                    st.headers.record_value(max(1, int((t_head - intended) * 1e6)))
                    st.total.record_value(max(1, int((t_end - intended) * 1e6)))
                return
            probe = StreamProbe(t_head)
            async for chunk in r.content.iter_any():
                probe.on_chunk(chunk)
            if st is None or not probe.record(st, intended):
                return
            st.ok += 1
            st.headers.record_value(max(1, int((t_head - intended) * 1e6)))
            st.total.record_value(max(1, int((probe.last - intended) * 1e6)))
    except asyncio.CancelledError:
        if st is not None:
            st.error("timeout")
        raise
    except (aiohttp.ClientError, OSError) as e:
        if st is not None:
            st.error(type(e).__name__)


async def send_one_raw(
    pool: ClientPool, target: Target, body: bytes, stream: bool, intended: float, st: Stats | None
) -> None:
    """:func:`send_one` on the minimal HTTP/1.1 client (plain HTTP targets)."""
    path = urlsplit(target.chat_url).path
    hdrs = [("Authorization", f"Bearer {target.api_key}"), ("Content-Type", "application/json")]
    hdrs += list(target.headers.items())
    t_head = 0.0
    status = 0
    probe = StreamProbe(0.0)

    def on_head(code: int) -> None:
        nonlocal t_head, status
        t_head = probe.last = time.perf_counter()
        status = code

    def on_data(chunk: bytes) -> None:
        if stream and status == 200:
            probe.on_chunk(chunk)

    try:
        await pool.request("POST", path, hdrs, body, on_head, on_data)
    except asyncio.CancelledError:
        if st is not None:
            st.error("timeout")
        raise
    except OSError as e:
        if st is not None:
            st.error(type(e).__name__)
        return
    t_end = time.perf_counter()
    if st is None:
        return
    if status != 200:
        st.error(f"http_{status}")
        return
    if stream and not probe.record(st, intended):
        return
    st.ok += 1
    st.headers.record_value(max(1, int((t_head - intended) * 1e6)))
    st.total.record_value(max(1, int((t_end - intended) * 1e6)))


# -- progress ------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (only when enabled) of the measured phase: it starts
    at `begin()`, after the warm-up, and counts recorded requests only. A run ends at
    `total` requests or after `duration` seconds, whichever comes first; the bar shows the
    bound that ends it: `done/total` requests, or `done` and the seconds out of `duration`.
    `rate` (arrivals per second, all targets) says which one that is in an open loop; without
    it (a closed loop) the bound nearer its end is shown."""

    def __init__(self, total: int, duration: float, enabled: bool, label: str = "", rate: float | None = None) -> None:
        self.total = max(1, total)
        self.duration = duration
        self.enabled = enabled
        self.label = label
        self.rate = rate
        self.start: float | None = None
        self._last = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()

    def _by_time(self, count_frac: float, time_frac: float) -> bool:
        if not self.duration:
            return False
        if self.rate is not None:
            return self.rate * self.duration < self.total
        return time_frac >= count_frac

    def update(self, done: int, failed: int, in_flight: int, force: bool = False) -> None:
        if not self.enabled or self.start is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.25:
            return
        self._last = now
        el = now - self.start
        count_frac = min(1.0, done / self.total)
        time_frac = min(1.0, el / self.duration) if self.duration else 0.0
        if self._by_time(count_frac, time_frac):
            frac, count, clock = time_frac, f"{done} done", f"{el:5.1f}/{self.duration:g}s"
        else:
            frac, count, clock = count_frac, f"{done}/{self.total}", f"{el:5.1f}s"
        bar = "#" * int(frac * 30)
        rate = done / el if el > 0 else 0.0
        sys.stderr.write(
            f"\r{self.label}[{bar:<30}] {frac * 100:5.1f}% {count} "
            f"{rate:7.0f} req/s  in-flight {in_flight:<5d} failed {failed:<6d} {clock}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# -- runs ------------------------------------------------------------------------------

SendFn = Callable[[int, float, Stats | None], Coroutine[Any, Any, None]]
"""send(target_index, intended_perf_counter, stats_or_None)."""


async def open_loop(
    send: SendFn,
    stats: list[Stats],
    load: Load,
    progress: Progress | None = None,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Constant arrival rate; latency from intended send times.

    With several targets, each arrival slot sends one request to every target with the
    same intended time (in an order that rotates from slot to slot), so that the
    generator's own timing artefacts (timer granularity, a busy loop) fall on all
    targets alike and cancel out of a per-percentile difference."""
    assert load.rate is not None and load.rate > 0
    n_t = len(stats)
    interval = 1.0 / load.rate
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def launch(slot: int, due: float, record: bool, now: float) -> None:
        for j in range(n_t):
            ti = (slot + j) % n_t
            st = stats[ti] if record else None
            if st is not None:
                st.sent += 1
                if now - due > 0.002:
                    st.late_sends += 1
            t = loop.create_task(send(ti, due, st))
            pending.add(t)
            t.add_done_callback(pending.discard)

    # Warm-up: unrecorded, at the same rate.
    for i in range(load.warmup):
        launch(i, time.perf_counter(), False, 0.0)
        await asyncio.sleep(interval)
    if pending:
        await asyncio.wait(set(pending), timeout=load.grace)
    if progress is not None:
        progress.begin()
    start = time.perf_counter()
    end = start + load.duration
    i = 0
    while i < load.requests:
        intended = start + i * interval
        if intended >= end:
            break
        now = time.perf_counter()
        if intended > now:
            await asyncio.sleep(intended - now)
        elif len(pending) >= load.max_in_flight:
            await asyncio.sleep(0.001)
            continue
        # Catch up: every slot already due is sent now, each keeping its own intended time.
        now = time.perf_counter()
        while i < load.requests and start + i * interval <= now and start + i * interval < end:
            launch(i, start + i * interval, True, now)
            i += 1
        if progress is not None:
            progress.update(sum(s.ok + s.failed for s in stats), sum(s.failed for s in stats), len(pending))
        if on_tick is not None:
            on_tick()
    await _finish(pending, load.grace, progress, stats, on_tick)
    elapsed = time.perf_counter() - start
    for s in stats:
        s.elapsed_s = elapsed


async def closed_loop(send: SendFn, stats: list[Stats], load: Load, progress: Progress | None = None) -> None:
    """`concurrency` workers per target, back to back; measures maximum throughput."""
    n_t = len(stats)
    budget = [load.requests] * n_t
    for i in range(load.warmup * n_t):
        await send(i % n_t, time.perf_counter(), None)
    if progress is not None:
        progress.begin()
    start = time.perf_counter()
    end = start + load.duration

    async def worker(ti: int) -> None:
        st = stats[ti]
        while budget[ti] > 0 and time.perf_counter() < end:
            budget[ti] -= 1
            st.sent += 1
            await send(ti, time.perf_counter(), st)
            if progress is not None:
                progress.update(sum(s.ok + s.failed for s in stats), sum(s.failed for s in stats), 0)

    tasks = {asyncio.ensure_future(worker(ti)) for ti in range(n_t) for _ in range(load.concurrency)}
    await _finish(tasks, load.duration + load.grace, progress, stats, None)
    elapsed = time.perf_counter() - start
    for s in stats:
        s.elapsed_s = elapsed


async def _finish(
    pending: set[asyncio.Task[None]],
    grace: float,
    progress: Progress | None,
    stats: list[Stats],
    on_tick: Callable[[], None] | None,
) -> None:
    deadline = time.perf_counter() + grace
    while pending and time.perf_counter() < deadline:
        done, _ = await asyncio.wait(set(pending), timeout=0.25)
        pending.difference_update(done)
        if progress is not None:
            progress.update(sum(s.ok + s.failed for s in stats), sum(s.failed for s in stats), len(pending))
        if on_tick is not None:
            on_tick()
    for t in list(pending):
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    if progress is not None:
        progress.update(sum(s.ok + s.failed for s in stats), sum(s.failed for s in stats), 0, force=True)
        progress.close()


def make_session(limit: int = 256) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        skip_auto_headers=("User-Agent",),
    )


async def run(
    targets: list[Target],
    load: Load,
    *,
    stream: bool = False,
    prompt_tokens: int = 32,
    bodies: list[bytes] | None = None,
    progress: bool = False,
    label: str = "",
    on_tick: Callable[[], None] | None = None,
    client: str = "auto",
    distinct: bool = True,
) -> list[Stats]:
    """Runs one load against the targets; returns one Stats per target.

    `client`: "raw" (the minimal HTTP/1.1 client of :mod:`edgeroute.bench.http1`), "aiohttp", or
    "auto" (raw for http:// URLs, aiohttp for https://). `distinct`: every request's prompt is
    its own (`numbered`), as real traffic's are, unless `bodies` are given; a cache's bench
    passes False, so that its few bodies repeat and hit."""
    stats = [Stats(t.name) for t in targets]
    per_target = [
        bodies if bodies else [chat_body(t.model, prompt_tokens, stream, seed) for seed in range(16)] for t in targets
    ]
    number = numbered if distinct and not bodies else None
    counter = [0]
    conns = load.connections
    if load.rate is None and conns:
        conns = max(conns, load.concurrency)
    pools: list[ClientPool | None] = []
    for t in targets:
        u = urlsplit(t.url)
        raw = client == "raw" or (client == "auto" and u.scheme == "http")
        pools.append(ClientPool(u.hostname or "127.0.0.1", u.port or 80, conns) if raw else None)
    async with make_session(conns * len(targets)) as session:

        async def send(ti: int, intended: float, st: Stats | None) -> None:
            counter[0] += 1
            b = per_target[ti][counter[0] % len(per_target[ti])]
            if number is not None:
                b = number(b, counter[0])
            pool = pools[ti]
            if pool is not None:
                await send_one_raw(pool, targets[ti], b, stream, intended, st)
            else:
                await send_one(session, targets[ti], b, stream, intended, st)

        total = load.requests * len(targets)
        rate = None if load.rate is None else load.rate * len(targets)
        prog = Progress(total, load.duration, progress, label, rate)
        if load.rate is None:
            await closed_loop(send, stats, load, prog)
        else:
            await open_loop(send, stats, load, prog, on_tick)
    for p in pools:
        if p is not None:
            p.close()
    return stats


def merge_percentiles(h: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, ms) points for a percentile plot, on a log scale of 1/(1-p)."""
    if h.get_total_count() == 0:
        return []
    pts = []
    k = 0.0
    while True:
        p = 100.0 * (1 - math.pow(10, -k))
        pts.append((p, h.get_value_at_percentile(p) / 1000))
        if p >= 99.999 or k > 5:
            break
        k += 0.125
    return pts
