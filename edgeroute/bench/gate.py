"""The CI latency gate: ``python -m edgeroute.bench.gate`` (or ``edgeroute bench gate``).

A short overhead scenario in a realistic set-up (default 20 s at 300 req/s per target,
~1,500-token chat bodies, 50 rules, four deployments, a budget on, the ledger and request log
written, the proxy not pinned), with a bare aiohttp pass-through (the floor) as a third
target interleaved in the same phase, against nginx answering a canned completion (the Python
mock when nginx is not installed). It prints the added latency p50/p99/p99.9 of both and
passes when

- edgeroute's median added latency is under the limit (1 ms, the design's promise) or, on a
  machine so slow or busy that the do-nothing pass-through itself adds half of that, under
  `--p50-factor` times the floor's median, and
- its p99 added latency is under `--p99-factor` times the floor's p99 added latency, or
  under `--p99-ms`.

Why relative bounds, and why interleaved: on a shared 2-core VM the same code's added median
moved 0.7-11 ms between minutes (steal, a neighbour's load), and the bare pass-through's with
it; a floor measured in its own phase a minute later could not tell a slow minute from a
regression, and at 500 req/s per target the bench's own generator and Python mock saturated
the machine (the floor itself failed an absolute 1 ms). Interleaved, the ratio of edgeroute's
added latency to the floor's held at 1.1-1.4 through those swings, while a change that adds a
millisecond of work per request doubles it.

A try that fails gets another (up to 4): a real regression fails all of them. Exit 1 on
failure, 2 when the run itself failed (errors, no data).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgeroute.bench import nginx_upstream, scenarios, stack


def verdict(
    res: dict[str, Any], limit_ms: float, p99_factor: float, p99_ms: float, p50_factor: float = 2.0
) -> tuple[bool, str]:
    """Whether one try passes, and why (or why not)."""
    add, floor = res["added_ms"], res.get("floor_added_ms") or {}
    p50, p99 = add["p50"], add["p99"]
    floor_p99 = floor.get("p99")
    floor_p50 = floor.get("p50")
    p50_bound = max(limit_ms, p50_factor * floor_p50) if floor_p50 is not None else limit_ms
    if p50 >= p50_bound:
        return (
            False,
            f"median added latency {p50:.3f} ms >= {p50_bound:.3f} ms (floor's p50 {floor_p50} ms x {p50_factor})",
        )
    bound = max(p99_ms, p99_factor * floor_p99) if floor_p99 is not None else p99_ms
    if p99 > bound:
        return False, f"p99 added latency {p99:.3f} ms > {bound:.3f} ms (floor's p99 {floor_p99} ms x {p99_factor})"
    return True, f"p50 {p50:.3f} < {p50_bound:.3f} ms and p99 {p99:.3f} <= {bound:.3f} ms"


def beyond(res: dict[str, Any]) -> str:
    """What edgeroute adds over the do-nothing pass-through, at the median (the routing's own share)."""
    floor = (res.get("floor_added_ms") or {}).get("p50")
    if floor is None:
        return "no floor"
    p50 = res["added_ms"]["p50"]
    ratio = f" (x{p50 / floor:.2f})" if floor > 0 else ""
    return f"beyond the floor p50 {p50 - floor:+.3f} ms{ratio}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=300.0, help="requests/s to each target")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--rules", type=int, default=50)
    p.add_argument("--limit-ms", type=float, default=1.0, help="fail when median added latency >= this")
    p.add_argument("--p50-factor", type=float, default=2.0, help="p50 bound on a slow machine: this times the floor's")
    p.add_argument("--p99-factor", type=float, default=4.0, help="p99 bound: this times the floor's p99 added")
    # A regression guard, not the target (1 ms at p99): on a quiet 2-core machine the request
    # log's writer thread puts the realistic set-up's p99 at 2.5-4 ms today.
    p.add_argument("--p99-ms", type=float, default=5.0, help="a p99 added latency under this always passes")
    # Right after the test suite the machine is still busy for a while (a first try measured
    # p50 1.4 ms, the next 0.6 ms): a regression fails every try, noise only some.
    p.add_argument("--tries", type=int, default=4)
    p.add_argument(
        "--upstream", choices=("auto", "nginx", "mock"), default="auto",
        help="nginx (a canned answer, next to no CPU) or the Python mock; auto: nginx when installed",
    )  # fmt: skip
    p.add_argument(
        "--interleave", action=argparse.BooleanOptionalAction, default=True,
        help="the floor in edgeroute's phase (default) or in its own phase after it",
    )  # fmt: skip
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False, help="pin the proxies on one CPU")
    p.add_argument("--json", help="write the last try's results here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    common = stack.Common(
        duration=a.duration, requests=int(a.rate * a.duration) + 1, prompt_tokens=a.prompt_tokens,
        progress=a.progress, json=a.json, warmup=200, pin=a.pin,
    )  # fmt: skip
    upstream = a.upstream if a.upstream != "auto" else "nginx" if nginx_upstream.available() else "mock"
    for attempt in range(1, a.tries + 1):
        out = scenarios.overhead(
            common, [a.rate], rules=a.rules, floor=True, floor_interleaved=a.interleave, budgets=True, upstream=upstream
        )
        res = out["rates"][f"{a.rate:g}"]
        add, proxy = res["added_ms"], res["proxy"]
        if not add or proxy["failed"] or not proxy["ok"]:
            print(f"gate: try {attempt}: the run failed (proxy errors: {proxy['errors']})", flush=True)
            if attempt == a.tries:
                return 2
            continue
        ok, why = verdict(res, a.limit_ms, a.p99_factor, a.p99_ms, a.p50_factor)
        floor = res.get("floor_added_ms") or {}
        print(
            f"gate: try {attempt}: added latency p50 {add['p50']:.3f} ms, p99 {add['p99']:.3f} ms, "
            f"p99.9 {add['p99.9']:.3f} ms; floor (bare aiohttp) p50 {floor.get('p50')} ms, p99 {floor.get('p99')} ms; "
            f"{proxy['rps']:.0f} req/s; calibration {out['machine']['calibration_ms']} ms; {beyond(res)}: {why}",
            flush=True,
        )
        if ok:
            print("gate: PASS", flush=True)
            return 0
    print(f"gate: FAIL on {a.tries} tries", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
