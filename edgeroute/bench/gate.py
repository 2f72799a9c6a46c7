"""The CI latency gate: ``python -m edgeroute.bench.gate`` (or ``edgeroute bench gate``).

A short overhead scenario (default 20 s at 500 req/s, ~1,500-token chat bodies, a
config with 50 rules and four deployments): prints the added latency p50/p99/p99.9
and req/s, and exits 1 when the median added latency is >= the limit (1 ms) on
every one of up to 3 tries (a noisy CI machine gets a second chance; a real
regression fails all three). Exit 2 when the run itself failed (errors, no data).
"""

from __future__ import annotations

import argparse
import sys

from edgeroute.bench import scenarios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.gate", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--prompt-tokens", type=int, default=1500)
    p.add_argument("--rules", type=int, default=50)
    p.add_argument("--limit-ms", type=float, default=1.0, help="fail when median added latency >= this")
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--json", help="write the last try's results here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)
    common = scenarios.Common(
        duration=a.duration, requests=int(a.rate * a.duration) + 1, prompt_tokens=a.prompt_tokens,
        progress=a.progress, json=a.json, warmup=200,
    )  # fmt: skip
    for attempt in range(1, a.tries + 1):
        res = scenarios.overhead(common, [a.rate], rules=a.rules)["rates"][f"{a.rate:g}"]
        add = res["added_ms"]
        proxy = res["proxy"]
        if not add or proxy["failed"] or not proxy["ok"]:
            print(f"gate: try {attempt}: the run failed (proxy errors: {proxy['errors']})", flush=True)
            if attempt == a.tries:
                return 2
            continue
        print(
            f"gate: try {attempt}: added latency p50 {add['p50']:.3f} ms, p99 {add['p99']:.3f} ms, "
            f"p99.9 {add['p99.9']:.3f} ms; {proxy['rps']:.0f} req/s through edgeroute "
            f"(limit: p50 < {a.limit_ms} ms)",
            flush=True,
        )
        if add["p50"] < a.limit_ms:
            print("gate: PASS", flush=True)
            return 0
    print(f"gate: FAIL: median added latency >= {a.limit_ms} ms on {a.tries} tries", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
