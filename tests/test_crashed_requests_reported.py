"""Requests a `kill -9` left in flight appear in the spend reports, as the budgets count them.

A restart counts the reservations of requests that have no spend row as spent (whether their
provider billed them is unknown). `edgeroute spend` and `/admin/spend` showed nothing of them:
the budget said $0.04 spent, the reports $0, and nobody could tell which requests were lost.
Each is now a row of outcome `crashed` at its reservation's cost, estimated, with the route
its reservations name; a second restart counts it once (its row, no longer its reservation).
Real `edgeroute serve` processes, killed with SIGKILL; the openai SDK is the client.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.test_cost_restart import Served, _admitted, _budgets, _config, crash_with_four_in_flight

PER_MODEL = {"name": "per-model", "scope": "model", "limit_usd": 1.0, "period": "day"}


async def _spend(url: str, by: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + f"/admin/spend?by={by}") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


def _cli_spend(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "edgeroute", "spend", "--config", str(config), "--by", "outcome", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def _write(path: Path, upstream: str) -> None:
    cfg = _config(upstream, path.with_name("l.db"))  # every request costs exactly $0.01, reserved as much
    cfg["budgets"]["limits"].append(PER_MODEL)
    path.write_text(yaml.safe_dump(cfg))


async def test_requests_in_flight_at_a_crash_are_reported_as_crashed(start_upstream: Any, tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    _write(path, (await start_upstream(latency_ms=5000)).base_url)  # answers after the crash
    await crash_with_four_in_flight(path)
    _write(path, (await start_upstream()).base_url)
    second = await Served.start(path)
    try:
        assert (await _budgets(second.url))["budgets"][0]["spent_usd"] == 0.04
        assert await _admitted(second.url, 1) == 1
        await asyncio.sleep(0.4)  # past a flush: the crashed rows and the answer written

        report = await _spend(second.url, "outcome")
        crashed = next((r for r in report["rows"] if r["outcome"] == "crashed"), None)
        assert crashed is not None, report["rows"]
        assert crashed["requests"] == 4 and crashed["cost_usd"] == 0.04 and crashed["ok"] == 0
        assert report["total"]["cost_usd"] == 0.05  # the budget's spend: the same
        async with aiohttp.ClientSession() as http, http.get(second.url + "/admin/requests?limit=50") as r:
            listed = (await r.json())["data"]
        lost = [q for q in listed if q["outcome"] == "crashed"]
        assert len(lost) == 4 and all(q["cost_usd"] == 0.01 and q["route"] == "m" for q in lost), listed
        (route,) = (await _spend(second.url, "route"))["rows"]
        assert route["route"] == "m" and route["requests"] == 5  # the route their reservations named
    finally:
        second.kill()
    # `edgeroute spend` says the same, and a third start counts each crashed request once.
    cli = await asyncio.to_thread(_cli_spend, path)
    assert {r["outcome"]: r["cost_usd"] for r in cli["rows"]}["crashed"] == 0.04
    third = await Served.start(path)
    try:
        assert (await _budgets(third.url))["budgets"][0]["spent_usd"] == 0.05
        assert (await _spend(third.url, "outcome"))["total"]["cost_usd"] == 0.05
    finally:
        third.kill()
