"""`edgeroute bench soak`: a proxy of its own under keys, budgets, cache and request log; the RSS
curve and its verdict.

Run as users run it (a subprocess), briefly: a short run reports its figures and says it is not
judged (its second half is still the warm-up). The verdict's rules and the slope are checked on
known answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgeroute.bench.soak import Soak, min_judged_s, rise_mb, slope_mb_per_hour, verdict


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
    long = min_judged_s(20)
    assert long == 1080  # growth at 20 MB/h rises 3 MB (the noise) in a 540 s second half
    assert verdict(long, 5.0, 0.7, ok, True, opts) == (True, [])
    held, why = verdict(long, 25.0, 3.8, ok, True, opts)
    assert held is False and why == ["RSS grew 25.0 MB/h over the second half (bound 20), 3.8 MB in all (noise 3)"]
    assert verdict(long, 25.0, 2.0, ok, True, opts) == (True, [])  # a one-off step, not growth
    assert verdict(long - 1, 25.0, 3.8, ok, True, opts) == (None, [])  # too short: not judged
    held, why = verdict(60.0, 0.0, 0.0, {"200": 9, "502": 1}, True, opts)
    assert held is False and why == ["requests failed: {'502': 1}"]
    assert verdict(long, 0.0, 0.0, ok, False, opts) == (False, ["the proxy exited"])


def test_a_one_off_step_passes_and_steady_growth_fails() -> None:
    # What a healthy process does (a 2.5 MB step once, in the middle of the second half) and a
    # leak at 25 MB/h, sampled as the bench samples (every 5 s over a 540 s second half).
    opts = Soak(max_slope_mb_per_hour=20)
    ts = [540.0 + 5 * k for k in range(109)]
    step = [(t, 100.0 + (2.5 if t > 810 else 0.0)) for t in ts]
    leak = [(t, 100.0 + 25.0 * (t - 540) / 3600) for t in ts]
    spike = [(t, 100.0 + (40.0 if t == 1000 else 0.0)) for t in ts]
    for samples, held in ((step, True), (leak, False), (spike, True)):
        slope, rise = slope_mb_per_hour(samples), rise_mb(samples)
        assert verdict(1080, slope, rise, {"200": 1}, True, opts)[0] is held, (slope, rise)
    assert (slope_mb_per_hour(step) or 0) > 20  # the slope alone would have failed the step


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_a_soak_stopped_by_sigterm_stops_its_proxy_and_upstream() -> None:
    # `timeout`, a CI job cancelled, a `kill`: the bench died at once and left its proxy and
    # mock upstream running, orphaned, with their temporary directory.
    bench = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "bench", "soak", "--no-pin", "--duration", "60", "--rate", "5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
            children = _children(bench.pid)
        assert len(children) == 2, "the soak did not start its proxy and upstream"
        time.sleep(1)  # serving
        bench.send_signal(signal.SIGTERM)
        bench.wait(30)
        assert bench.returncode != 0
        assert [c for c in children if _running_edgeroute(c)] == [], "the proxy or upstream outlived the bench"
    finally:
        for c in children:  # ours, by PID, should the test fail
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait(5)


def _running_edgeroute(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"edgeroute" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
