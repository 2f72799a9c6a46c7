"""`edgeroute bench ...` (or `python -m edgeroute.bench`): the load generator, the scenarios, the CI gate, the mocks.

edgeroute bench run --url http://127.0.0.1:8080/v1 --model m --rate 500 --duration 10
edgeroute bench overhead --rates 500,1000 --duration 20
edgeroute bench throughput | compare | streaming | resources | failover | hedging | chaos | spike
edgeroute bench peer --peer-url http://127.0.0.1:4000/v1 --peer-model gpt-4o-mini --mock-port 18999
edgeroute bench soak --duration 1200      # memory over a long run, every per-process state in use
edgeroute bench gate                      # the CI latency gate (also `python -m edgeroute.bench.gate`)
edgeroute bench mock --port 9000          # a mock / fault-injecting upstream (`python -m edgeroute.bench.faults`)
"""

from __future__ import annotations

import argparse
import sys

from edgeroute.bench import attacks, loadgen, outages, report, scenarios, soak, spike, stack
from edgeroute.bench.loadgen import Load, Target


def _common(p: argparse.ArgumentParser, duration: float = 10.0, *, proxy: bool = True) -> None:
    """The options every load takes; `proxy`: the command starts an edgeroute of its own (so
    `--no-pin` and `--profile` have one to act on; `bench run` loads URLs it is given)."""
    p.add_argument("--duration", type=float, default=duration, help="seconds per run (a bound)")
    p.add_argument("--requests", type=int, default=100_000, help="requests per target per run (a bound)")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="approximate size of each chat body")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=sys.stderr.isatty(),
        help="a progress line on stderr (default: when stderr is a terminal)",
    )
    if proxy:
        p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the proxy to its own CPU")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--html", help="write a self-contained HTML report with a percentile plot here")
    if proxy:
        p.add_argument("--profile", help="profile the proxy with py-spy into this file (.svg, .txt raw, .json)")


def _c(a: argparse.Namespace) -> stack.Common:
    return stack.Common(
        a.duration, a.requests, a.prompt_tokens, a.progress, a.pin, a.html, a.json, profile=getattr(a, "profile", None)
    )


def _run(a: argparse.Namespace) -> int:
    targets = [Target(u, u, a.model, a.api_key) for u in a.url]
    load = Load(
        a.requests,
        a.duration,
        None if a.concurrency else a.rate,
        a.concurrency or 0,
        warmup=a.warmup,
        connections=a.connections,
    )
    stats = loadgen.arun(
        loadgen.run(targets, load, stream=a.stream, prompt_tokens=a.prompt_tokens, progress=a.progress, client=a.client)
    )
    print(report.table(stats))
    if a.stream:
        print(report.table(stats, "ttft_ms"))
        print(report.table(stats, "chunk_gap_ms"))
    for s in stats:
        if s.errors:
            print(f"{s.name}: errors {s.errors}")
        if s.late_sends:
            print(f"{s.name}: {s.late_sends} requests were sent >2 ms late (latency still counted from intended time)")
    data = {"stats": [s.summary() for s in stats]}
    if a.json:
        report.write_json(a.json, data)
    if a.html:
        report.write_html(a.html, "edgeroute bench run", stats, data)
    return 0 if all(s.ok for s in stats) else 1


def _overhead(a: argparse.Namespace) -> int:
    rates = [float(x) for x in a.rates.split(",")]
    scenarios.overhead(
        _c(a),
        rates,
        rules=a.rules,
        stream=a.stream,
        upstream_latency=a.upstream_latency,
        floor=a.floor,
        trace_ratio=a.trace_ratio,
        request_log=a.request_log == "on",
        cache=a.cache,
        budgets=a.budgets,
        limits=a.limits,
        beside=a.beside,
        workers=a.workers,
        upstream=a.upstream,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeroute bench", description="Load-test edgeroute or any OpenAI-compatible URL.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="open-loop (--rate) or closed-loop (--concurrency) load on URLs")
    r.add_argument("--url", action="append", required=True, help="base URL (…/v1); twice to interleave two")
    r.add_argument("--model", default="gpt-4o-mini", help="the model each request names (default: gpt-4o-mini)")
    r.add_argument("--api-key", default="bench", help="sent as Authorization: Bearer (default: bench)")
    r.add_argument("--rate", type=float, default=100.0, help="requests/s per URL (open loop)")
    r.add_argument("--concurrency", type=int, default=0, help="closed loop with N workers per URL (max throughput)")
    r.add_argument("--stream", action="store_true", help="streamed requests: time to first token and chunk gaps too")
    r.add_argument("--warmup", type=int, default=0, help="requests per URL sent first and not counted")
    r.add_argument("--connections", type=int, default=256, help="connections per URL (0: no limit)")
    r.add_argument(
        "--client", choices=["auto", "raw", "aiohttp"], default="auto", help="HTTP client (auto: raw for http://)"
    )
    _common(r, proxy=False)
    r.set_defaults(fn=_run)

    o = sub.add_parser("overhead", help="added latency: direct vs through edgeroute, interleaved")
    o.add_argument("--rates", default="500,1000")
    o.add_argument("--rules", type=int, default=50)
    o.add_argument("--stream", action="store_true", help="compare time to first token instead")
    o.add_argument(
        "--floor", action="store_true", help="also measure a bare aiohttp pass-through (see edgeroute.bench.floor)"
    )
    o.add_argument("--upstream-latency", default="0", help="mock delay before headers: 5 | normal:50,10 | ...")
    # Named here, `--upstream nginx` was read as `--upstream-latency nginx` (an abbreviation) and
    # the mock failed to start with no reason given.
    o.add_argument(
        "--upstream",
        choices=("mock", "nginx"),
        default="mock",
        help="the Python mock, or nginx with one canned answer (non-streaming chat, no latency, no OTLP sink)",
    )
    o.add_argument("--trace-ratio", type=float, help="tracing on at this sampling ratio (spans sent to the mock)")
    o.add_argument("--request-log", choices=("on", "off"), default="on", help="the request log (no content), as served")
    o.add_argument("--cache", action="store_true", help="the response cache on: after warm-up, every request is a hit")
    o.add_argument("--budgets", action="store_true", help="a global budget on (every request reserved and settled)")
    o.add_argument("--limits", action="store_true", help="per-key RPM and TPM limits on (every request takes both)")
    o.add_argument(
        "--beside", choices=sorted(scenarios.BESIDE), help="a second edgeroute with this change, interleaved (its cost)"
    )
    o.add_argument("--workers", type=int, default=1, help="serve --workers N (unpinned, on every CPU)")
    _common(o)
    o.set_defaults(fn=_overhead)

    t = sub.add_parser("throughput", help="max req/s of one proxy process (closed loop), and of the mock")
    t.add_argument("--concurrency", type=int, default=64)
    t.add_argument("--cache", action="store_true", help="the response cache on: hits per second of one process")
    t.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve --workers N, each pinned to a CPU (--cpu-affinity; --no-pin: free)",
    )
    t.add_argument(
        "--generator", choices=("python", "wrk"), default="python", help="the load: this process, or wrk (cheaper)"
    )
    t.add_argument(
        "--upstream",
        choices=("mock", "nginx"),
        default="mock",
        help="the Python mock, or nginx with one canned answer (a few µs per request: the proxy gets the cores)",
    )
    _common(t)
    t.set_defaults(
        fn=lambda a: scenarios.throughput(
            _c(a), a.concurrency, cache=a.cache, workers=a.workers, generator=a.generator, upstream=a.upstream
        )
    )

    k = sub.add_parser("compare", help="CPU per request of proxies from several source trees, same sitting")
    k.add_argument("--tree", action="append", required=True, help="a source checkout (built); first is the baseline")
    k.add_argument("--rounds", type=int, default=3)
    k.add_argument("--concurrency", type=int, default=64)
    _common(k)
    k.set_defaults(fn=lambda a: scenarios.compare(_c(a), a.tree, a.rounds, a.concurrency))

    s = sub.add_parser("streaming", help="added TTFT and chunk pacing")
    s.add_argument("--rate", type=float, default=100.0)
    s.add_argument("--tokens", type=int, default=32)
    s.add_argument("--tps", type=float, default=200.0, help="mock tokens per second")
    _common(s)
    s.set_defaults(fn=lambda a: scenarios.streaming(_c(a), a.rate, a.tokens, a.tps))

    m = sub.add_parser("resources", help="start-up time, RSS idle and with N concurrent streams")
    m.add_argument("--streams", type=int, default=1000)
    _common(m, duration=8.0)
    m.set_defaults(fn=lambda a: scenarios.resources(_c(a), a.streams))

    f = sub.add_parser("failover", help="one deployment fails mid-run")
    f.add_argument("--rate", type=float, default=200.0)
    f.add_argument("--mode", default="refuse", help="an edgeroute.bench.faults mode: refuse, 503, hang, reset, ...")
    f.add_argument("--outage", type=float, default=5.0)
    _common(f)
    f.set_defaults(fn=lambda a: outages.failover(_c(a), a.rate, a.mode, a.outage))

    h = sub.add_parser("hedging", help="heavy-tailed upstream with and without hedging")
    h.add_argument("--rate", type=float, default=100.0)
    h.add_argument("--latency", default="lognormal:20,1.0")
    _common(h, duration=20.0)
    h.set_defaults(fn=lambda a: outages.hedging(_c(a), a.rate, a.latency))

    c = sub.add_parser("chaos", help="10,000 requests while one deployment is killed and restarted")
    c.add_argument("--rate", type=float, default=250.0)
    c.add_argument("--total", type=int, default=10_000)
    c.add_argument("--base-ejection-ms", type=int, default=2000, help="proxy's health.base_ejection_ms (0: default)")
    _common(c)
    c.set_defaults(fn=lambda a: outages.chaos(_c(a), a.rate, a.total, base_ejection_ms=a.base_ejection_ms or None))

    sp = sub.add_parser("spike", help="load stepping past a primary's capacity: spillover, priority classes")
    sp.add_argument("--rates", default="50,100,200,300", help="req/s of each step")
    sp.add_argument("--capacity", type=int, default=20, help="the primary's max_concurrency")
    sp.add_argument("--service-ms", type=float, default=200.0, help="the primary's service time")
    sp.add_argument("--secondary-ms", type=float, default=300.0, help="the secondary's service time")
    sp.add_argument("--reserve-percent", type=int, default=40, help="of the primary, for the interactive class")
    sp.add_argument("--interactive-rate", type=float, default=15.0)
    sp.add_argument("--batch-rate", type=float, default=150.0)
    _common(sp, duration=5.0)
    sp.set_defaults(fn=lambda a: spike.spike(
        _c(a), tuple(float(r) for r in a.rates.split(",")), a.service_ms, a.secondary_ms, a.capacity,
        a.reserve_percent, a.interactive_rate, a.batch_rate,
    ))  # fmt: skip

    pe = sub.add_parser("peer", help="overhead of edgeroute and of another gateway, side by side")
    pe.add_argument("--peer-url", required=True)
    pe.add_argument("--peer-model", default="gpt-4o-mini")
    pe.add_argument("--peer-key", default="bench")
    pe.add_argument("--rate", type=float, default=200.0)
    pe.add_argument("--mock-port", type=int, default=18999, help="fixed, so the peer can be configured to call it")
    _common(pe)
    pe.set_defaults(fn=lambda a: scenarios.peer(_c(a), a.peer_url, a.peer_model, a.peer_key, a.rate, a.mock_port))

    at = sub.add_parser("attack", help="hostile clients against a proxy of its own; are others still served?")
    at.add_argument(
        "--attacks",
        default=",".join(attacks.ATTACKS),
        help=f"which, in order (default all: {', '.join(attacks.ATTACKS)})",
    )
    at.add_argument(
        "--probe-p99-ms", type=float, default=attacks.Bounds.probe_p99_ms, help="bound on the health checks' p99"
    )
    at.add_argument("--rss-mb", type=float, default=attacks.Bounds.rss_mb, help="bound on the proxy's RSS growth")
    at.add_argument("--duration", type=float, default=5.0, help="seconds per attack")
    at.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the proxy to its own CPU")
    at.add_argument("--json", help="write results as JSON here")
    at.add_argument("--profile", help="profile the proxy with py-spy, one file per attack (.svg, .txt raw, .json)")
    at.set_defaults(fn=_attack)

    so = sub.add_parser("soak", help="memory over a long run with keys, budgets, cache and request log in use")
    so.add_argument("--rate", type=float, default=soak.Soak.rate, help="requests/s (open loop)")
    so.add_argument("--cache-entries", type=int, default=soak.Soak.cache_entries, help="the cache's max_entries")
    so.add_argument(
        "--max-slope-mb-per-hour",
        type=float,
        default=soak.Soak.max_slope_mb_per_hour,
        help="bound on the RSS's growth over the run's second half",
    )
    so.add_argument("--duration", type=float, default=1200.0, help="seconds (the second half is judged)")
    so.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the proxy to its own CPU")
    so.add_argument("--json", help="write results as JSON here")
    so.set_defaults(fn=_soak)

    g = sub.add_parser("gate", help="the CI latency gate (see edgeroute.bench.gate)", add_help=False)
    g.add_argument("rest", nargs=argparse.REMAINDER)
    g.set_defaults(fn=lambda a: _gate(a.rest))

    mk = sub.add_parser("mock", help="a mock / fault-injecting upstream (see edgeroute.bench.faults)", add_help=False)
    mk.add_argument("rest", nargs=argparse.REMAINDER)
    mk.set_defaults(fn=lambda a: _mock(a.rest))
    # A missing command is named by the commands, not by argparse's `dest` ("required: cmd").
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    return p


def _attack(a: argparse.Namespace) -> int:
    """Exit 1 when any attack got through (a probe failed, or a bound was passed)."""
    bounds = attacks.Bounds(a.probe_p99_ms, a.rss_mb)
    common = stack.Common(duration=a.duration, pin=a.pin, json=a.json, profile=a.profile)
    return 0 if attacks.attack(common, [n.strip() for n in a.attacks.split(",") if n.strip()], bounds)["held"] else 1


def _soak(a: argparse.Namespace) -> int:
    """Exit 1 when the RSS kept growing, a request failed or the proxy exited."""
    common = stack.Common(duration=a.duration, pin=a.pin, json=a.json)
    opts = soak.Soak(a.rate, a.cache_entries, a.max_slope_mb_per_hour)
    return 1 if soak.soak(common, opts)["held"] is False else 0


def _gate(argv: list[str]) -> int:
    from edgeroute.bench import gate

    return gate.main(argv)


def _mock(argv: list[str]) -> int:
    from edgeroute.bench import faults

    return faults.main(argv, prog="edgeroute bench mock")


_DELEGATED = {"gate": _gate, "mock": _mock}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:  # before argparse, whose REMAINDER would not take leading options
        return _DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    result = args.fn(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
