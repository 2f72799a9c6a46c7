"""The event-loop lag sampler: a stall shows in /metrics and in the log."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiohttp import ClientSession

from edgeroute import looplag
from tests.conftest import Proxy

CFG = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k-secret-xx"}},
    "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
    "models": {"m": {"deployments": ["d"]}},
}


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_a_stalled_loop_is_measured_and_logged(start_proxy, caplog: pytest.LogCaptureFixture) -> None:
    proxy: Proxy = await start_proxy(CFG)
    await asyncio.sleep(0.35)  # a few samples of a healthy loop
    with caplog.at_level(logging.WARNING, logger="edgeroute.loop"):
        time.sleep(0.3)  # noqa: ASYNC251 - a synchronous call on the loop: the stall the sampler is for
        await asyncio.sleep(0.25)
    since = time.monotonic()
    async with ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    assert _sample(text, "edgeroute_event_loop_lag_max_seconds") >= 0.2
    assert _sample(text, 'edgeroute_event_loop_lag_seconds_bucket{le="0.1"}') < _sample(
        text, 'edgeroute_event_loop_lag_seconds_bucket{le="+Inf"}'
    )
    assert any("event loop stalled" in r.getMessage() for r in caplog.records)
    # The maximum is per scrape: the next one holds only the lag since this one, which is at most
    # the time since it began plus a sample's interval (a stall of the host lengthens both).
    async with ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        worst = _sample(await r.text(), "edgeroute_event_loop_lag_max_seconds")
    assert worst <= time.monotonic() - since + looplag.INTERVAL_S, f"the 0.3 s stall was reported again: {worst}"


async def test_the_gil_switch_interval_is_short_while_an_app_runs() -> None:
    """A background thread (the ledger's writer) holding the GIL keeps a woken loop waiting at
    most the switch interval: 0.5 ms while any app runs (apps may overlap), the interpreter's
    own value again once the last one has stopped."""
    import sys

    from aiohttp import web

    from edgeroute.metrics import METRICS, Metrics

    others = looplag._apps_running  # apps of other tests still running in this process
    before = sys.getswitchinterval()
    runners = []
    for _ in range(2):
        app = web.Application()
        app[METRICS] = Metrics()
        looplag.install(app)
        runners.append(web.AppRunner(app))
    try:
        await runners[0].setup()
        assert sys.getswitchinterval() == pytest.approx(looplag.SWITCH_INTERVAL_S)
        await runners[1].setup()
        await runners[0].cleanup()  # the other still runs
        assert sys.getswitchinterval() == pytest.approx(looplag.SWITCH_INTERVAL_S)
    finally:
        for r in runners:
            await r.cleanup()
    assert looplag._apps_running == others
    assert sys.getswitchinterval() == (before if others == 0 else pytest.approx(looplag.SWITCH_INTERVAL_S))
