"""How long the console's overview takes to load over a day of a million stored requests.

    python -m edgeroute.bench.requestlog stats --rows 1000000 --keep /tmp/log-1m.db
    python -m tests.ui.overview_speed --db /tmp/log-1m.db [--runs 5]

The first command stores a million synthetic requests over the last 24 hours through the
ledger's own writer (so the request log and its rollups are the real ones); this serves
that database, signs in with headless Chromium and times the overview from navigation to
every section drawn, for the 24-hour and the 30-day range. A developer's measurement, not
a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.ui.browser import start_browser, wait_idle
from tests.ui.harness import TOKENS, Console

KPI = '[data-field="requests"]'


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.0f} ms ({max(samples) * 1000:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True, help="a ledger database filled by edgeroute.bench.requestlog")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(args.db, work / "ledger.db")
        console = Console(work).start()
        drv = start_browser()
        try:
            drv.get(console.url + "/ui/")
            drv.execute_script(f"sessionStorage.setItem('edgeroute.console.key', '{TOKENS['admin']}')")
            for rng in ("24h", "30d"):
                prefs = f"JSON.stringify({{range: '{rng}'}})"
                drv.execute_script(f"localStorage.setItem('edgeroute.console.prefs', {prefs})")
                times, kpis = [], []
                for _ in range(args.runs):
                    start = time.monotonic()
                    drv.get(f"{console.url}/ui/?r={start}#/overview")
                    WebDriverWait(drv, 30, poll_frequency=0.02).until(lambda d: d.find_elements(By.CSS_SELECTOR, KPI))
                    kpis.append(time.monotonic() - start)
                    wait_idle(drv, timeout=30)
                    times.append(time.monotonic() - start)
                requests = drv.find_element(By.CSS_SELECTOR, KPI).text
                print(f"overview, range {rng}: {requests} requests shown; median (max) over {args.runs} loads: "
                      f"headline figures {ms(kpis)}, every section drawn {ms(times)}", flush=True)  # fmt: skip
        finally:
            drv.quit()
            console.stop()


if __name__ == "__main__":
    main()
