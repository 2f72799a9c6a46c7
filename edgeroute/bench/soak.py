"""`edgeroute bench soak`: the proxy's memory over a long run with every per-process state in use.

What users of gateways report is memory that grows for days. A proxy of the bench's realistic
config gets, on top, each state kept per tenant, per prompt or per period: `KEYS` keys in five
teams, budgets per key (a day) and per user (a rolling hour: each key's user, 50 counters; a
request's `user` field is not a budget's subject), the response cache (bounded by
`cache_entries`) and the request log with redacted content. No budget period ends within a
run: the forgetting of ended counters is tested over simulated days instead
(tests/test_budget_counters_ended.py). The load is an open loop at `rate`
req/s: each request from a random key with a tag and a `user` of its own, `REPEAT_SHARE` of them
one of `REPEATED` prompts (cache hits), the rest new text with an email address (redacted),
`STREAM_SHARE` of them streamed.

RSS is sampled every `SAMPLE_S`. The report gives it at start, at the end of the first half
(the warm-up: the cache and SQLite's page caches fill) and at the end, with the slope over the
second half in MB per hour. A state that is never freed shows as a slope that stays above
zero however long the run; run it long enough (the default 15 minutes) for the bounded ones to
fill. The command fails (exit 1) when a request failed, or when the second half's slope passes
`max_slope_mb_per_hour` and the RSS rose by more than `NOISE_MB` over it: a one-off step (an
allocator arena, a page cache) is not growth. So a run is judged only when growth at the bound
would rise past that noise within its second half (`min_judged_s`: 18 minutes at 20 MB/h);
a shorter run is reported, not judged.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from edgeroute.bench.stack import PUBLIC_MODEL, Common, Stack, bench_config, rss_sampler, say, write_result

KEYS = 50
REPEATED = 50  # distinct prompts sent again and again: the cache's hits
REPEAT_SHARE = 0.3
STREAM_SHARE = 0.3
SAMPLE_S = 5.0
MAX_IN_FLIGHT = 256  # the load's own bound: past it a request is counted late, not sent
MIN_JUDGED_S = 300.0  # shorter, the second half is still the warm-up (the cache filling)
# One-off RSS steps of a healthy process (a new allocator arena, SQLite's page cache): 1-3 MB.
NOISE_MB = 3.0
EDGE_SHARE = 0.2  # the second half's first and last fifths: its levels at start and end


@dataclass(frozen=True)
class Soak:
    rate: float = 150.0
    cache_entries: int = 2000
    max_slope_mb_per_hour: float = 20.0


def token(i: int) -> str:
    return f"soak-key-{i:03d}-not-a-secret"


def soak_config(upstream: str, cache_entries: int) -> dict[str, Any]:
    cfg = bench_config({"p0": upstream, "p1": upstream})
    cfg["keys"] = {f"k{i}": {"token": token(i), "team": f"team{i % 5}", "user": f"user{i}"} for i in range(KEYS)}
    cfg["budgets"] = {
        "limits": [
            {"name": "per-key-day", "scope": "key", "limit_usd": 1e6, "period": "day"},
            {"name": "per-user-hour", "scope": "user", "limit_usd": 1e6, "period": "rolling", "window_hours": 1},
        ]
    }
    cfg["models"][PUBLIC_MODEL]["cache"] = {"ttl": 3600, "scope": "key", "max_entries": cache_entries}
    cfg["request_log"] = {"log_content": "redacted"}
    return cfg


def slope_mb_per_hour(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB per hour; None under three samples."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return sum((t - mt) * (m - mm) for t, m in samples) / var * 3600


def min_judged_s(max_slope_mb_per_hour: float) -> float:
    """The shortest run whose second half would show growth at the bound past `NOISE_MB`."""
    return max(MIN_JUDGED_S, 2 * NOISE_MB / max_slope_mb_per_hour * 3600)


def rise_mb(samples: list[tuple[float, float]]) -> float | None:
    """How much the level rose from start to end of `samples` (seconds, MB): the median of the
    last `EDGE_SHARE` of them less that of the first, so a lone spike moves neither."""
    if len(samples) < 3:
        return None
    k = max(1, round(len(samples) * EDGE_SHARE))
    return statistics.median(m for _, m in samples[-k:]) - statistics.median(m for _, m in samples[:k])


def verdict(
    duration: float, slope: float | None, rise: float | None, statuses: dict[str, int], alive: bool, opts: Soak
) -> tuple[bool | None, list[str]]:
    """(held, why not): False when the proxy exited, a request failed or, on a run of
    `min_judged_s` or more, the second half's slope passed the bound and its RSS rose by more
    than `NOISE_MB`; None when the run was too short to judge the RSS (growth at the bound
    would not show above the noise)."""
    why_not = []
    if not alive:
        why_not.append("the proxy exited")
    failed = {k: v for k, v in statuses.items() if k != "200"}
    if failed:
        why_not.append(f"requests failed: {failed}")
    bound = opts.max_slope_mb_per_hour
    judged = duration >= min_judged_s(bound) and slope is not None and rise is not None
    if judged and slope is not None and rise is not None and slope > bound and rise > NOISE_MB:
        why_not.append(
            f"RSS grew {slope:.1f} MB/h over the second half (bound {bound:g}), {rise:.1f} MB in all"
            f" (noise {NOISE_MB:g})"
        )
    if why_not:
        return False, why_not
    return (True if judged else None), why_not


async def _load(port: int, seconds: float, rate: float) -> dict[str, Any]:
    """The open loop: one request every 1/`rate` s for `seconds`; what came back."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    statuses: dict[str, int] = {}
    late = 0
    rng = random.Random(0)
    running: set[asyncio.Task[None]] = set()

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        repeat = rng.random() < REPEAT_SHARE
        text = (
            f"repeat {i % REPEATED}" if repeat else f"question {i} {rng.getrandbits(48):x}: mail me at u{i}@example.com"
        )
        body = {
            "model": PUBLIC_MODEL,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "user": f"end-user-{i}",
            "stream": rng.random() < STREAM_SHARE,
        }
        headers = {"Authorization": f"Bearer {token(rng.randrange(KEYS))}", "x-edgeroute-tags": f"soak,t{i % 97}"}
        try:
            async with s.post(url, json=body, headers=headers) as r:
                await r.read()
                status = str(r.status)
        except (TimeoutError, aiohttp.ClientError) as e:
            status = type(e).__name__
        statuses[status] = statuses.get(status, 0) + 1

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)) as s:
        start = time.monotonic()
        i = 0
        while (now := time.monotonic() - start) < seconds:
            while i < now * rate:
                if len(running) >= MAX_IN_FLIGHT:
                    late += 1
                else:
                    task = asyncio.create_task(one(s, i))
                    running.add(task)
                    task.add_done_callback(running.discard)
                i += 1
            await asyncio.sleep(0.005)
        if running:
            await asyncio.wait(running)
    return {"sent": i - late, "late": late, "statuses": statuses}


def soak(c: Common, opts: Soak = Soak()) -> dict[str, Any]:
    """Runs the soak for `c.duration` seconds; prints and writes the RSS curve and its verdict."""
    out: dict[str, Any] = {"scenario": "soak", "duration_s": c.duration, "rate": opts.rate}
    with Stack(c.pin) as stack:
        mock = stack.upstream(name="mock")
        proxy, _ = stack.proxy(soak_config(f"http://127.0.0.1:{mock.port}/v1", opts.cache_entries))
        t0 = time.monotonic()
        with rss_sampler(proxy, SAMPLE_S) as rss:
            out["load"] = asyncio.run(_load(proxy.port, c.duration, opts.rate))
        alive = proxy.alive()
    # The sampler appends one value per SAMPLE_S from t0 (its first at once).
    samples = [(k * SAMPLE_S, mb) for k, mb in enumerate(rss)]
    half = [(t, mb) for t, mb in samples if t >= c.duration / 2]
    slope = slope_mb_per_hour(half)
    out["rss_mb"] = {
        "start": round(samples[0][1], 1) if samples else None,
        "half": round(half[0][1], 1) if half else None,
        "end": round(samples[-1][1], 1) if samples else None,
        "peak": round(max(rss), 1) if rss else None,
        "samples": [round(mb, 1) for mb in rss],
    }
    out["slope_mb_per_hour_second_half"] = None if slope is None else round(slope, 1)
    rise = rise_mb(half)
    out["rise_mb_second_half"] = None if rise is None else round(rise, 1)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["held"], out["why_not"] = verdict(c.duration, slope, rise, out["load"]["statuses"], alive, opts)
    r, load = out["rss_mb"], out["load"]
    say(
        f"soak {c.duration:g} s at {opts.rate:g} req/s: {load['sent']} sent, statuses {load['statuses']}; "
        f"RSS {r['start']} MB at start, {r['half']} at half time, {r['end']} at the end (peak {r['peak']}); "
        f"second half {out['slope_mb_per_hour_second_half']} MB/h, {out['rise_mb_second_half']} MB in all: "
        + (
            "FAILED: " + "; ".join(out["why_not"])
            if out["why_not"]
            else "held"
            if out["held"]
            else f"not judged (the RSS is judged on runs of {min_judged_s(opts.max_slope_mb_per_hour):g} s or more)"
        )
    )
    write_result(c, "soak", [], out)
    return out
