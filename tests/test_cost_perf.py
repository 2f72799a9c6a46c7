"""The added latency of admission (budget + rate-limit checks), in process and with Redis.

Figures are reported at the end of the run, not asserted (tests/perf.py): `pytest -m perf`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from edgeroute import config as config_mod
from edgeroute.accounting import RequestRecord, Usage
from edgeroute.admission import ADMISSION
from edgeroute.cost.control import CostControl
from edgeroute.server import create_app
from edgeroute.state import STATE
from tests.perf import Perf
from tests.test_cost_support import one_deployment, require_redis

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50})


BUDGETS = {"limits": [
    {"name": "per-key", "scope": "key", "limit_usd": 1e9},
    {"name": "team", "scope": "team", "limit_usd": 1e9, "period": "day"},
    {"name": "global", "scope": "global", "limit_usd": 1e9, "period": "rolling", "window_hours": 24},
]}  # fmt: skip
LIMITS = {"per_key": {"rpm": 10**9, "tpm": 10**12}, "models": {"m": {"rpm": 10**9}}}


def _cfg(budgets: bool = True, limits: bool = True, **extra: Any) -> dict[str, Any]:
    if budgets:
        extra["budgets"] = BUDGETS
    if limits:
        extra["rate_limits"] = LIMITS
    return one_deployment("http://127.0.0.1:9/v1", **extra)


async def _measure(cfg_data: dict[str, Any], n: int, clock: Any = time.process_time) -> float:
    """Microseconds per admit + settle: CPU time of this process by default (the machine may be
    shared), wall time for Redis (round trips)."""
    app = create_app(config_mod.parse(cfg_data), "perf")
    control = app[ADMISSION]
    assert isinstance(control, CostControl)
    decision = app[STATE].live.router.decide(BODY)
    req = make_mocked_request("POST", "/v1/chat/completions", app=app)
    for i in range(n + 200):
        if i == 200:
            t0 = clock()
        rec = RequestRecord(request_id="r", started=0.0, model="m")
        ticket = await control.admit(req, decision, rec)
        rec.cost_usd, rec.usage = 0.0001, Usage(10, 20)
        control.settle(ticket, rec)
    per = (clock() - t0) / n * 1e6
    await control.close()
    for up in app[STATE].live.upstreams.values():
        await up.close()
    return per


@pytest.mark.perf
async def test_admission_overhead_in_process(perf: Perf) -> None:
    n = 5000
    both = await _measure(_cfg(), n)
    budgets = await _measure(_cfg(limits=False), n)
    limits = await _measure(_cfg(budgets=False), n)
    perf.report("admission in process, admit + settle: 3 budgets", budgets, "us", "< 100")
    perf.report("admission in process, admit + settle: 3 buckets (key rpm+tpm, model rpm)", limits, "us", "< 100")
    perf.report("admission in process, admit + settle: both", both, "us", "< 100")


@pytest.mark.perf
async def test_admission_overhead_with_redis(perf: Perf) -> None:
    url = require_redis()
    n = 1000
    prefix = f"edgeroute-perf-{time.time_ns()}"
    per = await _measure(_cfg(shared_state={"redis_url": url, "prefix": prefix}), n, clock=time.perf_counter)
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()
    perf.report("admission with redis on loopback (1 round trip; settlement batched after)", per, "us", "< 300")
