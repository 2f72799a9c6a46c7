"""How long the console's overview takes to load over a day of a million stored requests.

    python -m tests.ui.overview_speed [--requests 1000000] [--runs 5]

Seeds a SQLite ledger with synthetic requests spread over the last 24 hours (written
through the ledger's own writer, so the request log and its rollups are the real ones),
serves it, signs in with headless Chromium and times the overview from navigation to
every section drawn, for the 24-hour and the 30-day range. A developer's measurement,
not a test: it takes minutes to seed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.cost.ledger import Ledger, SqliteBackend
from edgeroute.requestlog.settings import RequestLog
from tests.ui.browser import start_browser, wait_idle
from tests.ui.harness import TOKENS, Console


def seed(db: Path, n: int, now: float) -> None:
    rng = random.Random(7)
    ledger = Ledger(SqliteBackend(db), flush_interval=1.0, request_log=RequestLog())
    t0 = now - 86400
    models = ("m", "cheap", "backup")
    deps = {"m": ("d-primary", "primary"), "cheap": ("d-cheap", "cheap"), "backup": ("d-backup", "backup")}
    for i in range(n):
        model = models[i % 3]
        dep, prov = deps[model]
        lat = rng.lognormvariate(5, 1)
        ok = rng.random() > 0.03
        usage = Usage(rng.randint(1, 500), rng.randint(1, 300))
        cost = usage.completion_tokens * 1e-6 if ok else 0.0
        attempt = AttemptRecord(dep, prov, "success" if ok else "server_error", 200 if ok else 502, lat,
                                usage=usage if ok else None, cost_usd=cost)  # fmt: skip
        rec = RequestRecord(
            request_id=f"syn-{i}", started=t0 + i * (86400 / n), model=model, route=model,
            team=("red", "blue")[i % 2], key=f"k{i % 5}", status=200 if ok else 502,
            outcome="ok" if ok else "error", latency_ms=lat, deployment=dep if ok else None,
            usage=usage if ok else None, cost_usd=cost, attempts=[attempt],
        )  # fmt: skip
        rec.ttft_ms = lat / 3
        ledger.record(rec)
        if i % 20000 == 19999:
            ledger.flush()
    ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.monotonic()
        seed(work / "ledger.db", args.requests, time.time())
        print(f"seeded {args.requests:,} requests in {time.monotonic() - t:.0f} s", flush=True)
        console = Console(work).start()
        drv = start_browser()
        try:
            drv.get(console.url + "/ui/")
            drv.execute_script(f"sessionStorage.setItem('edgeroute.console.key', '{TOKENS['admin']}')")
            for rng in ("24h", "30d"):
                prefs = f"JSON.stringify({{range: '{rng}'}})"
                drv.execute_script(f"localStorage.setItem('edgeroute.console.prefs', {prefs})")
                times = []
                for _ in range(args.runs):
                    start = time.monotonic()
                    drv.get(f"{console.url}/ui/?r={start}#/overview")
                    wait_idle(drv, timeout=30)
                    times.append(time.monotonic() - start)
                requests = drv.find_element("css selector", '[data-field="requests"]').text
                print(f"overview, range {rng}: {requests} requests shown; load to drawn "
                      f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
                      f"over {args.runs} loads", flush=True)  # fmt: skip
        finally:
            drv.quit()
            console.stop()


if __name__ == "__main__":
    main()
