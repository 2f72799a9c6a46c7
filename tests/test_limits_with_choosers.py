"""Budgets and rate limits on a model that chooses among routes (an experiment, a policy).

Budgets of scope `model` and `rate_limits.models` count the route that serves a request (an
experiment's variant, a policy's choice), as the ledger records it. One named after the
choosing model itself matched no request: a $0.00001 budget and a limit of 2 requests a
minute on an experiment let every request through, and the config loaded without a word.
Such a config is refused now, naming the routes to limit instead.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.test_cost_support import cost_proxy


def _config(up_url: str, **limits: Any) -> dict[str, Any]:
    price = {"input_per_mtok": 0, "output_per_mtok": 1000}
    return {
        "providers": {"p": {"base_url": up_url}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": price}},
        "models": {
            "smart-a": {"deployments": ["d"]},
            "smart-b": {"deployments": ["d"]},
            "smart": {
                "experiment": {
                    "sticky": "user",
                    "variants": [{"route": "smart-a", "percent": 50}, {"route": "smart-b", "percent": 50}],
                }
            },
        },
        **limits,
    }


async def _check(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeroute", "check", str(path)]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)


async def test_limits_named_after_a_choosing_model_are_refused_and_its_routes_limits_hold(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(reply_words=5)
    never = _config(
        up.base_url,
        rate_limits={"models": {"smart": {"rpm": 2}}},
        budgets={"limits": [{"name": "exp", "scope": "model", "match": "smart", "limit_usd": 0.00001}]},
    )
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(never))
    r = await _check(path)
    assert r.returncode == 1, r.stdout
    why = "model 'smart' chooses among routes (an experiment)"
    assert f"rate_limits.models.smart: {why}" in r.stderr, r.stderr
    assert f"budgets.limits[0].match: {why}" in r.stderr
    assert "name its routes ('smart-a', 'smart-b')" in r.stderr
    # Named by route, the limits hold for the requests the experiment sends there.
    routed = _config(up.base_url, rate_limits={"models": {"smart-a": {"rpm": 2}, "smart-b": {"rpm": 2}}})
    path.write_text(yaml.safe_dump(routed))
    assert (await _check(path)).returncode == 0
    async with cost_proxy(routed) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        statuses = []
        for _ in range(3):  # one user, one variant: its limit of 2 a minute refuses the third
            try:
                await client.chat.completions.create(
                    model="smart", messages=[{"role": "user", "content": "hi"}], max_tokens=5, user="u1"
                )
                statuses.append(200)
            except openai.RateLimitError as e:
                statuses.append(e.status_code)
        await client.close()
    assert statuses == [200, 200, 429]
