"""`edgeroute bench soak`: a proxy of its own under keys, budgets, cache and request log; the RSS
curve and its verdict.

Run as users run it (a subprocess), briefly: a short run reports its figures and says it is not
judged (its second half is still the warm-up). The verdict's rules and the slope are checked on
known answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeroute.bench.soak import MIN_JUDGED_S, Soak, slope_mb_per_hour, verdict


def test_a_short_soak_serves_every_request_and_reports_its_memory_unjudged(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "edgeroute", "bench", "soak", "--no-pin", "--duration", "12", "--rate", "40",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    load = report["load"]
    assert load["statuses"] == {"200": load["sent"]} and load["sent"] >= 400
    rss = report["rss_mb"]
    assert len(rss["samples"]) >= 3 and 20 < rss["start"] <= rss["peak"] < 1000
    assert report["held"] is None and report["why_not"] == []
    assert "not judged" in done.stdout


def test_the_slope_is_megabytes_an_hour() -> None:
    assert slope_mb_per_hour([(0.0, 100.0), (60.0, 101.0), (120.0, 102.0)]) == 60.0
    assert slope_mb_per_hour([(0.0, 100.0), (60.0, 100.0), (120.0, 100.0)]) == 0.0
    assert slope_mb_per_hour([(0.0, 100.0), (60.0, 101.0)]) is None


def test_the_verdict_judges_a_long_run_and_fails_on_growth_errors_or_a_dead_proxy() -> None:
    ok = {"200": 10}
    opts = Soak(max_slope_mb_per_hour=20)
    assert verdict(MIN_JUDGED_S, 5.0, ok, True, opts) == (True, [])
    held, why = verdict(MIN_JUDGED_S, 25.0, ok, True, opts)
    assert held is False and why == ["RSS grew 25.0 MB/h over the second half (bound 20)"]
    assert verdict(MIN_JUDGED_S - 1, 25.0, ok, True, opts) == (None, [])  # too short: not judged
    held, why = verdict(60.0, 0.0, {"200": 9, "502": 1}, True, opts)
    assert held is False and why == ["requests failed: {'502': 1}"]
    assert verdict(MIN_JUDGED_S, 0.0, ok, False, opts) == (False, ["the proxy exited"])
