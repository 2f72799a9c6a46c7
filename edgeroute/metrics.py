"""Prometheus metrics, rendered in the text exposition format at `GET /metrics`.

Updated once per request from its final record (a few dict increments), so the
request path pays next to nothing; gauges such as circuit state are read from the
core when scraped.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from aiohttp import web

from edgeroute import redact
from edgeroute.accounting import RequestRecord
from edgeroute.cost.ledger import Ledger
from edgeroute.state import RECORDER, STATE

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_CIRCUIT = {"closed": 0, "half_open": 1, "open": 2}


def _esc(v: str) -> str:
    v = redact.text(v)  # labels are config names; a secret pasted into one must not be scraped
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.attempts: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.cost: defaultdict[str, float] = defaultdict(float)
        self.tokens: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.hedges = 0
        self.malformed_requests = 0  # refused by the HTTP parser (`http_server`), never logged as tracebacks
        self.hedge_wins = 0
        self.duration: defaultdict[str, list[int]] = defaultdict(lambda: [0] * (len(_BUCKETS) + 1))
        self.duration_sum: defaultdict[str, float] = defaultdict(float)

    def observe(self, rec: RequestRecord) -> None:
        route = rec.route or "-"
        self.requests[(route, rec.status)] += 1
        for a in rec.attempts:
            self.attempts[(a.deployment, a.outcome)] += 1
            if a.hedge:
                self.hedges += 1
                if a.outcome == "success":
                    self.hedge_wins += 1
            if a.usage is not None:
                self.tokens[(a.deployment, "prompt")] += a.usage.prompt_tokens
                self.tokens[(a.deployment, "completion")] += a.usage.completion_tokens
        self.cost[route] += rec.cost_usd
        secs = rec.latency_ms / 1000
        self.duration[route][bisect.bisect_left(_BUCKETS, secs)] += 1
        self.duration_sum[route] += secs

    def render(self, app: web.Application) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_: str) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")

        family("edgeroute_requests_total", "counter", "Client requests by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f'edgeroute_requests_total{{route="{_esc(route)}",status="{status}"}} {n}')
        family("edgeroute_attempts_total", "counter", "Upstream attempts by deployment and outcome.")
        for (dep, outcome), n in sorted(self.attempts.items()):
            out.append(f'edgeroute_attempts_total{{deployment="{_esc(dep)}",outcome="{outcome}"}} {n}')
        family("edgeroute_hedges_total", "counter", "Hedged attempts sent.")
        out.append(f"edgeroute_hedges_total {self.hedges}")
        family("edgeroute_malformed_requests_total", "counter", "Requests the HTTP parser refused (400/431).")
        out.append(f"edgeroute_malformed_requests_total {self.malformed_requests}")
        family("edgeroute_hedge_wins_total", "counter", "Hedged attempts that answered first.")
        out.append(f"edgeroute_hedge_wins_total {self.hedge_wins}")
        family("edgeroute_tokens_total", "counter", "Tokens by deployment and kind.")
        for (dep, kind), n in sorted(self.tokens.items()):
            out.append(f'edgeroute_tokens_total{{deployment="{_esc(dep)}",kind="{kind}"}} {n}')
        family("edgeroute_cost_usd_total", "counter", "Spend in USD by route.")
        for route, c in sorted(self.cost.items()):
            out.append(f'edgeroute_cost_usd_total{{route="{_esc(route)}"}} {c:.8f}')
        family("edgeroute_request_duration_seconds", "histogram", "Client-visible request duration.")
        for route, counts in sorted(self.duration.items()):
            acc = 0
            r = _esc(route)
            for le, n in zip((*_BUCKETS, float("inf")), counts, strict=True):
                acc += n
                le_s = "+Inf" if le == float("inf") else repr(le)
                out.append(f'edgeroute_request_duration_seconds_bucket{{route="{r}",le="{le_s}"}} {acc}')
            out.append(f'edgeroute_request_duration_seconds_sum{{route="{r}"}} {self.duration_sum[route]:.6f}')
            out.append(f'edgeroute_request_duration_seconds_count{{route="{r}"}} {acc}')
        state = app[STATE]
        family("edgeroute_in_flight", "gauge", "Client requests in flight.")
        out.append(f"edgeroute_in_flight {state.counters.in_flight}")
        family("edgeroute_shed_total", "counter", "Requests refused because the proxy was at capacity.")
        out.append(f"edgeroute_shed_total {state.counters.shed}")
        ledger = app.get(RECORDER)
        if isinstance(ledger, Ledger):
            for name, what, value in (
                ("written", "Requests written to the spend ledger.", ledger.written),
                ("failed_batches", "Ledger writes that failed and were kept to retry.", ledger.failed_batches),
                ("set_aside", "Ledger records the store rejected (logged instead).", ledger.set_aside),
            ):
                family(f"edgeroute_ledger_{name}_total", "counter", what)
                out.append(f"edgeroute_ledger_{name}_total {value}")
        live = state.live
        family("edgeroute_deployment_circuit", "gauge", "Circuit state: 0 closed, 1 half-open, 2 open.")
        family("edgeroute_deployment_latency_ms", "gauge", "Peak-EWMA latency of successful attempts.")
        for d in live.deployments:
            h = live.router.health(d.index)
            name = _esc(d.name)
            out.append(f'edgeroute_deployment_circuit{{deployment="{name}"}} {_CIRCUIT[str(h["circuit"])]}')
            out.append(f'edgeroute_deployment_latency_ms{{deployment="{name}"}} {float(h["latency_ms"]):.3f}')
        return "\n".join(out) + "\n"


METRICS = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    text = request.app[METRICS].render(request.app)
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )
