"""Shadow traffic with budgets, across a restart: a budget reads the same spend before and after.

A shadow mirror is the operator's experiment, paid by the operator: it is recorded in the
ledger (outcome `shadow`) and reported by `edgeroute spend`, but no budget or rate limit of
the client counts it while the proxy runs. At start, budgets and rate-limit windows are
read back from the ledger: they must read the same spend, or a restart makes a key's budget
jump by its shadows' cost and refuses requests it admitted a moment before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually, shadow_config
from tests.test_cost_support import cost_proxy

CENT = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.01}
TEN_CENTS = {"input_per_mtok": 0, "output_per_mtok": 0, "per_request": 0.10}
KEY = "sk-combos-shadow-alice"
ADMIN = "sk-combos-shadow-admin"
TEAM_VIEWER = "sk-combos-shadow-research-viewer"


def _config(base_url: str, db: Path) -> dict[str, Any]:
    return shadow_config(
        base_url,
        CENT,
        TEN_CENTS,
        keys={
            "alice": {"token": KEY, "team": "research", "limits": {"rpm": 5}},
            "ops": {"token": ADMIN, "role": "admin"},
            "research-viewer": {"token": TEAM_VIEWER, "team": "research", "role": "viewer"},
        },
        ledger={"path": str(db), "flush_interval": 0.05},
        budgets={
            "limits": [{"name": "team-day", "scope": "team", "match": "research", "limit_usd": 0.05, "period": "day"}]
        },
    )


async def _budget(url: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            body = await r.json()
    assert r.status == 200, body
    return float(next(b for b in body["budgets"] if b["name"] == "team-day")["spent_usd"])


async def _ask(url: str) -> int:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.APIStatusError as e:
            return e.status_code
    return 200


async def test_a_restart_reads_back_the_budget_the_proxy_ran_with(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    db = tmp_path / "ledger.db"
    cfg = _config(up.base_url, db)
    async with cost_proxy(cfg) as proxy:
        assert [await _ask(proxy.url) for _ in range(3)] == [200, 200, 200]

        # Each answer was mirrored to the strong deployment ($0.10 a time)...
        async def mirrored() -> bool:
            return sum(1 for r in up.options.requests if r["body"]["model"] == "gpt-4o") == 3

        await eventually(mirrored, "three shadow requests sent")
        # ...but the team's budget counts its own requests: three cents.
        running = await _budget(proxy.url)
        assert abs(running - 0.03) < 1e-9, running
    async with cost_proxy(cfg) as again:
        restored = await _budget(again.url)
        assert abs(restored - running) < 1e-9, f"${running} while running, ${restored} after a restart"
        # Two more cents fit the $0.05 budget after the restart as they did before it, and
        # the key's RPM (5) has room for two more: its three requests, not their mirrors too.
        assert [await _ask(again.url) for _ in range(2)] == [200, 200]


async def _spend(url: str, token: str, by: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + f"/admin/spend?by={by}", headers={"Authorization": f"Bearer {token}"}) as r:
            body: dict[str, Any] = await r.json()
    assert r.status == 200, body
    return body


async def test_the_spend_report_keeps_mirrors_apart_from_the_team_whose_requests_they_mirror(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The team's report said it spent its requests and their mirrors (the operator's
    experiment, which its budget does not count): eleven times what its budget showed spent."""
    up = await start_upstream(record=True)
    cfg = _config(up.base_url, tmp_path / "ledger.db")
    async with cost_proxy(cfg) as proxy:
        assert [await _ask(proxy.url) for _ in range(2)] == [200, 200]

        async def recorded() -> bool:
            return (await _spend(proxy.url, ADMIN, "outcome"))["total"]["requests"] == 4

        await eventually(recorded, "two requests and their mirrors in the ledger")
        by_team = {r["team"]: r for r in (await _spend(proxy.url, ADMIN, "team"))["rows"]}
        by_key = {r["key"]: r for r in (await _spend(proxy.url, ADMIN, "key"))["rows"]}
        own = await _spend(proxy.url, TEAM_VIEWER, "key")  # the team's own view: its spend alone
        budget = await _budget(proxy.url)
    assert by_team["research"]["cost_usd"] == pytest.approx(0.02) and by_team["research"]["requests"] == 2
    assert by_team["(shadow)"]["cost_usd"] == pytest.approx(0.20) and by_team["(shadow)"]["requests"] == 2
    assert by_key["alice"]["cost_usd"] == pytest.approx(0.02) and by_key["(shadow)"]["cost_usd"] == pytest.approx(0.20)
    assert [r["key"] for r in own["rows"]] == ["alice"]
    assert own["total"]["cost_usd"] == pytest.approx(budget) == pytest.approx(0.02)
