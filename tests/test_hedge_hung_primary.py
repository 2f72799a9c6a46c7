"""A deployment that hangs while its hedges win: its circuit opens, and the route stops paying
for it. Found by a red team (session 35, redH F2): a deployment that accepted connections and
never answered lost every hedge race; a lost race was reported as a client's cancellation (no
failure), so its circuit stayed closed and, drawn first by `weighted`, it got all 40 of 40
requests, each billed for it and delayed by the hedge delay. A deployment merely slower than its
hedge, which answers in its usual time, loses races too and must stay in."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from edgeroute import config as config_mod
from edgeroute.config import ConfigError
from tests.conftest import eventually, simple_config

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _config(a: Any, b: Any) -> dict[str, Any]:
    """`m` over d-a (drawn first by weight) and d-b, hedged after 100 ms with no budget limit."""
    cfg = simple_config({"a": a, "b": b}, health={"consecutive_failures": 3, "base_ejection_ms": 1_500})
    cfg["deployments"]["d-a"]["weight"], cfg["deployments"]["d-b"]["weight"] = 1000, 1
    cfg["models"]["m"]["hedge"] = {"delay_ms": 100, "budget_percent": 100}
    return cfg


async def _deployment(url: str, name: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/admin/deployments") as r:
        found: dict[str, Any] = next(d for d in (await r.json())["deployments"] if d["name"] == name)
        return found


async def _served(client: openai.AsyncOpenAI) -> tuple[str, bool]:
    raw = await client.chat.completions.with_raw_response.create(**BODY)
    raw.parse()
    return raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-hedged") == "true"


async def test_a_hung_primary_whose_hedges_win_is_ejected_and_probed_later(
    start_upstream: Any, start_proxy: Any
) -> None:
    a, b = await start_upstream(record=True), await start_upstream(latency_ms=20)
    proxy = await start_proxy(_config(a, b))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        assert await _served(client) == ("d-a", False)  # it answers in a few ms
    a.options.latency_ms = 60_000  # it hangs: takes the connection, never answers
    a.options.requests.clear()
    served = [await _served(client) for _ in range(12)]
    # Every request is answered (by the hedge); once d-a's circuit opens, d-b alone, unhedged.
    assert all(dep == "d-b" for dep, _ in served), served
    # Two lost races in a row are no failure yet, the next three open the circuit (3 failures).
    assert len(a.options.requests) == 5, f"the hung deployment got {len(a.options.requests)} of 12"
    assert [h for _, h in served] == [True] * 5 + [False] * 7
    d_a = await _deployment(proxy.url, "d-a")
    assert (d_a["circuit"], d_a["failures"]) == ("open", 3), d_a
    # Half-open after `base_ejection_ms`, as for any failure: the next request probes it, loses
    # its race again without an answer, and the circuit opens again, for twice as long.
    await eventually(_half_open(proxy.url), "d-a half-open", within=10)
    assert await _served(client) == ("d-b", True)
    assert len(a.options.requests) == 6
    assert (await _deployment(proxy.url, "d-a"))["circuit"] == "open"
    assert [await _served(client) for _ in range(3)] == [("d-b", False)] * 3
    assert len(a.options.requests) == 6


def _half_open(url: str) -> Any:
    async def probe() -> bool:
        return (await _deployment(url, "d-a"))["circuit"] == "half_open"

    return probe


async def test_a_primary_slower_than_its_hedge_loses_races_and_stays_in(start_upstream: Any, start_proxy: Any) -> None:
    a, b = await start_upstream(record=True, latency_ms=300), await start_upstream(latency_ms=1_000)
    proxy = await start_proxy(_config(a, b))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(2):
        assert await _served(client) == ("d-a", True)  # hedged after 100 ms, answers first at 300
    b.options.latency_ms = 20  # now its hedge always wins: d-a loses at ~120 ms, a third of its time
    a.options.requests.clear()
    served = [await _served(client) for _ in range(12)]
    assert served == [("d-b", True)] * 12
    assert len(a.options.requests) == 12  # still first: slower, not hung
    d_a = await _deployment(proxy.url, "d-a")
    assert (d_a["circuit"], d_a["failures"], d_a["consecutive_failures"]) == ("closed", 0, 0), d_a


async def test_how_many_hung_losses_and_how_long_a_wait_are_the_configs(start_upstream: Any, start_proxy: Any) -> None:
    """`health.lost_races_in_a_row` and `health.lost_race_factor` (3 and 3 were constants): one
    hung-looking loss counts at once; a bad value is a config error naming the setting."""
    a, b = await start_upstream(record=True), await start_upstream(latency_ms=20)
    cfg = _config(a, b)
    cfg["health"]["lost_races_in_a_row"] = 1
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for _ in range(3):
        assert await _served(client) == ("d-a", False)
    a.options.latency_ms = 60_000  # it hangs
    a.options.requests.clear()
    served = [await _served(client) for _ in range(6)]
    # Each lost race is a timeout: `consecutive_failures` (3) of them open the circuit.
    assert served == [("d-b", True)] * 3 + [("d-b", False)] * 3
    assert len(a.options.requests) == 3
    for bad, why in (
        ({"lost_race_factor": 1.5}, "health.lost_race_factor: Input should be greater than or equal to 2"),
        ({"lost_races_in_a_row": 0}, "health.lost_races_in_a_row: Input should be greater than or equal to 1"),
    ):
        with pytest.raises(ConfigError, match=why):
            config_mod.parse(simple_config({"a": a}, health=bad), "edgeroute.yaml")
