"""`edgeroute bench attack`: the attacks reach a proxy of its own, and it reports what they did.

Run as users run it (a subprocess), with two short attacks: a slowloris (connections that never
finish their headers) and hostile counts (megabytes of one letter, abandoned at once). The proxy
must keep answering the probes; the report must say how many probes went through and what the
attacker got (a hostile prompt is served, not refused before it reaches the proxy's work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _attack(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", "bench", "attack", "--no-pin", *argv],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_the_attacks_run_and_the_proxy_holds(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    done = _attack("--attacks", "slowloris,hostile-counts", "--duration", "2", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["held"] is True
    slowloris, hostile = report["attacks"]
    assert (slowloris["attack"], hostile["attack"]) == ("slowloris", "hostile-counts")
    assert slowloris["attacker"]["opened"] == 500
    assert hostile["attacker"]["first_answered"] == "200" and hostile["attacker"]["sent_and_abandoned"] > 0
    for a in report["attacks"]:
        assert a["held"] and a["probes"]["chat"] > 5 and a["probes"]["health"] > 5 and a["probes"]["failed"] == 0
        assert a["health_ms"]["p99"] is not None
    assert "held" in done.stdout


def test_a_bound_passed_is_a_failure_with_its_reason(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    done = _attack("--attacks", "idle-connections", "--duration", "1", "--rss-mb", "0.001", "--json", str(out))
    assert done.returncode == 1
    (only,) = json.loads(out.read_text())["attacks"]
    assert not only["held"] and any("RSS grew" in why for why in only["why_not"])
    assert "FAILED: RSS grew" in done.stdout


def test_an_unknown_attack_is_named() -> None:
    done = _attack("--attacks", "slowloris,nope", "--duration", "1")
    assert done.returncode != 0
    assert "unknown attack nope" in done.stderr
