"""Large request bodies are decided, parsed and translated off the event loop.

The core's decision reads the whole text (JSON, every pattern rule, the PII detectors): about
10 ns a byte. It ran on the event loop for any body without token-per-minute limits, so each
client sending a 10 MB body stalled every other request by about a tenth of a second
(`edgeroute bench attack --attacks big-bodies`: the probes' p99 went to 3.5 s). A body over
64 KiB is now decided in a worker thread (the core releases the GIL), and an Anthropic body
over 1 MiB is parsed and translated there. What stalls the loop is read as the CPU time of the
proxy's loop thread, in a proxy process of its own (the test's client and upstream would stall a
shared loop): its lag, wall time, grew with other jobs on a loaded machine."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edgeroute import config as config_mod
from edgeroute.core import build_router
from edgeroute.dispatch.stream_usage import with_stream_usage
from tests.governance_support import Instance, instances, write_config

WORDS = " ".join(f"ref{i % 997} note" for i in range(1_300_000))  # ~14 MB of prose, no rule matches it


def _config(upstream: str) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {"name": f"ticket-{i}", "when": {"patterns": [rf"\bTICKET-{i}-\d{{4}}\b"]}, "then": {"route": "m"}}
        for i in range(40)
    ]
    rules.append({"name": "pii", "when": {"pii": ["email", "payment_card", "iban"]}, "then": {"route": "m"}})
    return {
        "server": {"max_body_bytes": 32 << 20},
        "providers": {"p": {"base_url": upstream, "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x", "context_window": 10_000_000}},
        "models": {"m": {"deployments": ["d"]}},
        "rules": rules,
    }


def _decide_seconds(cfg: dict[str, Any], body: bytes) -> float:
    """What one decision on `body` costs, measured here: the stall it was on the proxy's loop."""
    router = build_router(config_mod.parse(cfg, "test.yaml"))
    router.decide(b'{"model": "m", "messages": [{"role": "user", "content": "warm"}]}')
    started = time.process_time()
    router.decide(body)
    return time.process_time() - started


def _loop_cpu(pid: int) -> float:
    """CPU seconds the proxy's event-loop thread (its main thread) has used. Work on the loop is
    what stalls it; unlike the loop's lag (wall time), this does not grow when other jobs take
    the machine's cores (a lag of 0.115 s was read under a load average of 6, the decision off
    the loop)."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    utime, stime = stat.rpartition(")")[2].split()[11:13]
    return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


async def _typical_loop_cpu(proxy: Instance, path: str, body: bytes, extra: dict[str, str]) -> tuple[float, list[int]]:
    """Three requests with `body`, one at a time; the median of the CPU time the proxy's loop
    thread spent during each (s), and their statuses. A decision on the loop is on it during
    every request; the median leaves out one request that met other work of the loop's."""
    async with aiohttp.ClientSession() as s:

        async def one() -> int:
            headers = {"Content-Type": "application/json", **extra}
            async with s.post(proxy.url + path, data=body, headers=headers) as r:
                await r.read()
                return r.status

        statuses, spent = [], []
        for _ in range(3):
            before = _loop_cpu(proxy.proc.pid)
            statuses.append(await one())
            spent.append(_loop_cpu(proxy.proc.pid) - before)
        return sorted(spent)[1], statuses


async def test_large_bodies_are_decided_and_translated_off_the_loop(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = _config(up.base_url)
    chat = {"model": "m", "messages": [{"role": "user", "content": WORDS}]}
    stall = _decide_seconds(cfg, orjson.dumps(chat))
    assert stall > 0.08, f"a decision takes {stall:.3f} s here: make the body larger for this test to mean anything"
    with instances(write_config(tmp_path / "edgeroute.yaml", cfg), 1) as (proxy,):
        # The Anthropic body is parsed and translated in a thread that holds the GIL for each of
        # orjson's calls (tens of milliseconds on 14 MB): less of a margin than the chat path's.
        for path, body, extra, bound in (
            # Reading 14 MB and relaying take ~0.05 s of the loop (CPU time counts in 10 ms ticks);
            # a decision on it adds `stall` (0.13 s): 3/4 of it tells the two apart with a tick to spare.
            ("/v1/chat/completions", orjson.dumps(chat), {}, stall * 0.75),
            ("/v1/messages", orjson.dumps({**chat, "max_tokens": 16}), {"anthropic-version": "2023-06-01"}, stall),
        ):
            worst, statuses = await _typical_loop_cpu(proxy, path, body, extra)
            assert statuses == [200, 200, 200], path
            assert worst < bound, (path, f"the loop worked {worst:.3f} s a request; a decision takes {stall:.3f} s")


def test_every_body_decided_off_the_loop_is_decided_without_the_gil() -> None:
    """The core keeps the GIL for a short body (the loop waits for its decision either way;
    releasing it only handed it to the ledger writer, a GIL round trip per request) and
    releases it from `DETACH_FROM_BYTES` on. Every body Python sends to a worker thread must be
    past that size, or a worker deciding it would hold the loop for the whole decision."""
    from edgeroute import _core
    from edgeroute.dispatch.attempt import COUNT_ON_LOOP_BYTES
    from edgeroute.openai_api import DECIDE_ON_LOOP_BYTES

    assert DECIDE_ON_LOOP_BYTES >= _core.DETACH_FROM_BYTES
    assert COUNT_ON_LOOP_BYTES >= _core.DETACH_FROM_BYTES


def test_a_long_decision_lets_other_threads_run() -> None:
    """A decision of a long body runs with the GIL released: a Python thread makes progress
    during it (with the GIL held it could not run at all until the decision returned). The body
    is 12 MB: 4 MB took the core 20 ms once it got faster, too short a call to judge."""
    import threading

    router = build_router(config_mod.parse(_config("http://127.0.0.1:9/v1"), "test.yaml"))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": WORDS[: 12 << 20]}]})
    seen: list[float] = []  # when the thread ran, every 1,000 turns of its loop
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 1000 == 0:
                seen.append(time.perf_counter())

    # Right before and after the call the thread may get a turn (the interpreter hands over the
    # GIL between bytecodes, and the thread asked for it while the call ran): only its runs in
    # the call's first half count. The thread also needs a core: on a busy host it may get none
    # during one call, so up to five calls are tried. With the GIL held, no call could ever show
    # the thread running, so the retries cannot let that bug through.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    t = threading.Thread(target=spin)
    t.start()
    tries: list[tuple[int, float]] = []
    try:
        router.decide(body)
        margin = 0.005
        for _ in range(5):
            started = time.perf_counter()
            router.decide(body)
            ended = time.perf_counter()
            half = started + (ended - started) / 2
            tries.append((sum(started + margin < s < half for s in seen), ended - started))
            assert ended - started > 4 * margin, ended - started  # long enough for the thread to show
            if tries[-1][0] >= 3:
                break
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(switch)
    assert tries[-1][0] >= 3, tries


async def test_a_large_stream_with_its_own_stream_options_is_built_off_the_loop(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A stream asked without usage is asked upstream with it (`with_stream_usage`): a body that
    already had `stream_options` was parsed and written again for that, each attempt, on the
    loop (0.3-0.5 s for this one: many small messages are the costly kind to parse). Now only
    the client's `stream_options` object is parsed, and a large body's request is built in a
    worker thread."""
    up = await start_upstream(record=True)
    cfg = _config(up.base_url)
    chat = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": False},
        "messages": [{"role": "user", "content": f"ref{i} note"} for i in range(300_000)],
    }
    body = orjson.dumps(chat)
    started = time.process_time()
    orjson.dumps(orjson.loads(body))  # what rewriting it whole costs, the GIL held throughout
    stall = time.process_time() - started
    assert stall > 0.08, f"a rewrite takes {stall:.3f} s here: make the body larger for this test to mean anything"
    assert orjson.loads(with_stream_usage(body))["stream_options"] == {"include_usage": True}
    with instances(write_config(tmp_path / "edgeroute.yaml", cfg), 1) as (proxy,):
        worst, statuses = await _typical_loop_cpu(proxy, "/v1/chat/completions", body, {})
        assert statuses == [200, 200, 200]
        # The rest of a 14 MB request (its read, the depth check) stays on the loop: 30-80 ms here.
        assert worst < stall, f"the loop worked {worst:.3f} s a request; a rewrite takes {stall:.3f} s"
        # The upstream was asked for the usage; the client, who did not ask, is not sent it.
        assert up.options.requests[-1]["body"]["stream_options"] == {"include_usage": True}
