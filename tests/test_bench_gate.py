"""The CI gate's verdict and the machine reference printed beside every benchmark."""

from __future__ import annotations

import io
import sys

import pytest

from edgeroute.bench import loadgen, reference
from edgeroute.bench.gate import beyond, verdict


def _res(p50: float, p99: float, floor_p99: float | None, floor_p50: float = 0.1) -> dict[str, object]:
    res: dict[str, object] = {"added_ms": {"p50": p50, "p99": p99}}
    if floor_p99 is not None:
        res["floor_added_ms"] = {"p50": floor_p50, "p99": floor_p99}
    return res


@pytest.mark.parametrize(
    ("p50", "p99", "floor_p99", "ok"),
    [
        (0.4, 0.9, 0.3, True),  # well within both
        (1.2, 0.9, 0.3, False),  # a quick floor: the median limit is absolute
        (0.4, 1.5, 0.3, True),  # above 3x the floor, under the 2 ms that always passes (here)
        (0.4, 2.5, 0.3, False),  # above both bounds
        (0.4, 5.0, 2.0, True),  # a slow day: the floor's own p99 is 2 ms, 3x that bounds ours
        (0.4, 2.5, None, False),  # no floor measured: the absolute bound alone
    ],
)
def test_gate_verdict(p50: float, p99: float, floor_p99: float | None, ok: bool) -> None:
    passed, why = verdict(_res(p50, p99, floor_p99), limit_ms=1.0, p99_factor=3.0, p99_ms=2.0)
    assert passed is ok, why


@pytest.mark.parametrize(
    ("p50", "floor_p50", "ok"),
    [
        (0.9, 0.45, True),  # under the limit
        (1.4, 0.45, False),  # a floor under half the limit leaves the limit absolute
        (2.9, 1.6, True),  # a slow minute: the pass-through itself adds 1.6 ms, ours 1.8x that
        (3.3, 1.6, False),  # over twice the floor's: a regression, however slow the minute
        (1.2, None, False),  # no floor measured: the limit alone
    ],
)
def test_gate_median_bound_follows_a_slow_floor(p50: float, floor_p50: float | None, ok: bool) -> None:
    res = _res(p50, 1.0, None) if floor_p50 is None else _res(p50, 1.0, 5.0, floor_p50)
    passed, why = verdict(res, limit_ms=1.0, p99_factor=4.0, p99_ms=5.0, p50_factor=2.0)
    assert passed is ok, why


def test_the_gate_prints_what_edgeroute_adds_beyond_the_floor() -> None:
    assert beyond(_res(1.2, 3.0, 5.0, floor_p50=0.8)) == "beyond the floor p50 +0.400 ms (x1.50)"
    assert beyond(_res(0.1, 3.0, 5.0, floor_p50=-0.05)) == "beyond the floor p50 +0.150 ms"
    assert beyond(_res(0.4, 3.0, None)) == "no floor"


def test_machine_reference_is_measured_and_figures_scale_by_it() -> None:
    ref = reference.machine(rounds=2)
    assert ref["calibration_ms"] > 0 and ref["cpus"] >= 1
    assert reference.per_reference(ref["calibration_ms"] * 2, ref) == pytest.approx(2.0, rel=1e-3)
    assert reference.per_reference(None, ref) is None


def test_progress_counts_the_measured_phase_only(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = loadgen.Progress(total=100, duration=10.0, enabled=True, label="t ")
    bar.update(50, 0, 0, force=True)  # still warming up: nothing to show
    assert err.getvalue() == ""
    bar.begin()
    bar.update(10, 1, 3, force=True)
    line = err.getvalue()
    assert "10/100" in line and " 10.0%" in line and "failed 1" in line
