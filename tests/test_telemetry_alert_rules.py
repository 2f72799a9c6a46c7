"""Alert rules evaluated over a window filled with known records, on an injected clock:
thresholds, no-data, deduplication, cooldown, resolution, and each kind's value."""

from __future__ import annotations

from typing import Any

import pytest

from edgeroute import config as config_mod
from edgeroute import secrets
from edgeroute.accounting import AttemptRecord, MemoryRecorder, RequestRecord
from edgeroute.server import create_app
from edgeroute.state import STATE, Live
from edgeroute.telemetry.alerts import AlertEngine
from edgeroute.telemetry.notify import Notifier
from edgeroute.telemetry.settings import Alerts
from edgeroute.telemetry.window import Window

T0 = 1_800_000_000.0


def _live(alerts: dict[str, Any]) -> tuple[Live, Alerts]:
    cfg = config_mod.parse(
        {
            "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
            "deployments": {"d-a": {"provider": "p", "model": "x"}, "d-b": {"provider": "p", "model": "x"}},
            "models": {"m": {"deployments": ["d-a", "d-b"]}},
            "alerts": {"webhooks": {"ops": {"url": "http://127.0.0.1:9/hook"}}, **alerts},
        },
        "t.yaml",
    )
    return create_app(cfg, "t.yaml", MemoryRecorder())[STATE].live, cfg.alerts


def _rec(dep: str, ok: bool, *, latency_ms: float = 10.0, status: int = 200, cost: float = 0.0) -> RequestRecord:
    r = RequestRecord("req", T0, "m", route="m", status=status, cost_usd=cost)
    r.attempts.append(AttemptRecord(dep, "p", "success" if ok else "server_error", 200 if ok else 503, latency_ms))
    return r


def _events(n: Notifier) -> list[tuple[str, str, str]]:
    out = []
    while not n.queue.empty():
        x = n.queue.get_nowait()
        out.append((x.event, x.alert["rule"], x.alert["subject"]))
    return out


async def test_error_rate_fires_once_resolves_and_respects_cooldown() -> None:
    rule = {"name": "errs", "kind": "error_rate", "threshold": 0.5, "window_s": 10, "min_requests": 4}
    live, cfg = _live({"cooldown_s": 60, "rules": [rule]})
    notifier = Notifier()
    engine, window = AlertEngine(notifier), Window()
    for _ in range(3):
        window.add(_rec("d-a", False), T0)
    engine.evaluate(cfg, live, window, (), T0)
    assert not engine.firing  # three attempts: below min_requests, nothing changes
    window.add(_rec("d-a", False), T0 + 1)
    window.add(_rec("d-b", True), T0 + 1)
    for t in (T0 + 1, T0 + 2, T0 + 3):  # evaluated three times while the outage lasts
        engine.evaluate(cfg, live, window, (), t)
    assert list(engine.firing) == [("errs", "d-a")]
    assert engine.firing[("errs", "d-a")].value == 1.0
    assert _events(notifier) == [("firing", "errs", "d-a")]  # once, not per evaluation
    # No traffic at all for a while: silence is not recovery.
    engine.evaluate(cfg, live, window, (), T0 + 30)
    assert ("errs", "d-a") in engine.firing
    for _ in range(4):
        window.add(_rec("d-a", True), T0 + 31)
    engine.evaluate(cfg, live, window, (), T0 + 32)
    assert not engine.firing and engine.recent[0].state == "resolved" and engine.recent[0].resolved_at == T0 + 32
    assert _events(notifier) == [("resolved", "errs", "d-a")]
    # It fires again within the cooldown: listed, but neither its firing nor its resolution is sent.
    for _ in range(8):
        window.add(_rec("d-a", False), T0 + 40)
    engine.evaluate(cfg, live, window, (), T0 + 41)
    assert ("errs", "d-a") in engine.firing
    for _ in range(40):
        window.add(_rec("d-a", True), T0 + 45)
    engine.evaluate(cfg, live, window, (), T0 + 46)
    assert not engine.firing and _events(notifier) == []
    # After the cooldown it notifies again.
    for _ in range(8):
        window.add(_rec("d-a", False), T0 + 120)
    engine.evaluate(cfg, live, window, (), T0 + 121)
    assert _events(notifier) == [("firing", "errs", "d-a")]
    listing = engine.listing()
    assert [a["state"] for a in listing["firing"]] == ["firing"] and len(listing["recent"]) == 2


@pytest.mark.parametrize(
    ("rule", "fill", "subject", "value"),
    [
        ({"kind": "latency_p95", "threshold": 100, "min_requests": 5},
         [("d-b", True, 500.0, 200, 0.0)] * 20, "d-b", 500),
        ({"kind": "spend_per_hour", "threshold": 10, "window_s": 60}, [("d-a", True, 10.0, 200, 0.5)] * 1, "all", 30),
        ({"kind": "rate_limited_rate", "threshold": 0.2, "min_requests": 4},
         [("d-a", True, 10.0, 429, 0.0)] * 2 + [("d-a", True, 10.0, 200, 0.0)] * 2, "all", 0.5),
    ],
)  # fmt: skip
async def test_kinds_measure_what_they_say(rule: dict[str, Any], fill: list[Any], subject: str, value: float) -> None:
    live, cfg = _live({"rules": [{"name": "r", "window_s": 60, **rule}]})
    engine, window = AlertEngine(Notifier()), Window()
    for dep, ok, lat, status, cost in fill:
        window.add(_rec(dep, ok, latency_ms=lat, status=status, cost=cost), T0)
    engine.evaluate(cfg, live, window, (), T0 + 1)
    (alert,) = engine.firing.values()
    assert alert.subject == subject and alert.value == pytest.approx(value)
    assert alert.message.startswith(f"r: {subject}: ")


async def test_a_reload_that_removes_the_rule_resolves_its_alerts() -> None:
    rule = {"name": "errs", "kind": "error_rate", "threshold": 0.1, "min_requests": 1}
    live, cfg = _live({"rules": [rule]})
    engine, window = AlertEngine(Notifier()), Window()
    window.add(_rec("d-a", False), T0)
    engine.evaluate(cfg, live, window, (), T0)
    assert engine.firing
    engine.evaluate(Alerts(), live, window, (), T0 + 1)
    assert not engine.firing and engine.recent[0].rule == "errs"


async def test_a_secret_that_cannot_be_read_again_fires_until_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "STATUS", secrets.Status())
    live, cfg = _live({"rules": [{"name": "secrets", "kind": "secret_refresh_failed"}]})
    notifier = Notifier()
    engine, window = AlertEngine(notifier), Window()
    engine.evaluate(cfg, live, window, (), T0)
    assert not engine.firing
    secrets.STATUS.failing.add("file:/run/secrets/openai")
    engine.evaluate(cfg, live, window, (), T0 + 1)
    engine.evaluate(cfg, live, window, (), T0 + 2)
    assert _events(notifier) == [("firing", "secrets", "file:/run/secrets/openai")]
    (alert,) = engine.firing.values()
    assert "last good value" in alert.message
    secrets.STATUS.failing.clear()
    engine.evaluate(cfg, live, window, (), T0 + 3)
    assert not engine.firing and _events(notifier) == [("resolved", "secrets", "file:/run/secrets/openai")]


def test_an_hour_of_a_busy_deployment_costs_a_few_megabytes() -> None:
    """The window keeps an hour: 721 slots, each with up to 256 latency and 256 TTFT samples
    per deployment. Held as a list of float objects that was 12 MB per busy deployment (a
    gateway with 50 deployments: 600 MB after an hour); as unboxed doubles, under 4 MB. The
    bound leaves room for what other threads of the test process allocate meanwhile (traced
    too: 4.6 MB was seen once under two test workers)."""
    import tracemalloc

    w = Window()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for slot in range(721):
            for i in range(300):
                rec = _rec("d", True, latency_ms=float(i))
                rec.attempts[0].ttft_ms = float(i) / 2
                w.add(rec, slot * 5.0 + 1.0)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(w.slots) == 721 and len(w.slots[-1].deployments["d"].latencies_ms) == 256
    assert used < 6_000_000, f"{used / 1e6:.1f} MB"


async def test_a_worker_other_than_the_lead_notifies_its_own_traffic_only() -> None:
    """Under `serve --workers N`, a worker's traffic window is its own (a client's keep-alive
    connection stays on one worker): it notifies its error rate; a budget, alike in every
    worker, is notified by worker 0 alone."""
    rules = [
        {"name": "errs", "kind": "error_rate", "threshold": 0.5, "window_s": 10, "min_requests": 2},
        {"name": "spend", "kind": "budget_percent", "threshold": 50},
    ]
    live, cfg = _live({"rules": rules})
    budget = config_mod.Budget.model_validate({"name": "month", "scope": "global", "limit_usd": 1.0})
    seen = {}
    for lead in (True, False):
        notifier = Notifier()
        engine, window = AlertEngine(notifier, lead=lead), Window()
        for _ in range(2):
            window.add(_rec("d-a", False), T0)
        engine.evaluate(cfg, live, window, [(budget, 0.9)], T0)
        assert {k[0] for k in engine.firing} == {"errs", "spend"}  # both shown by every worker
        seen[lead] = sorted(_events(notifier))
    assert seen[True] == [("firing", "errs", "d-a"), ("firing", "spend", "month")]
    assert seen[False] == [("firing", "errs", "d-a")]
