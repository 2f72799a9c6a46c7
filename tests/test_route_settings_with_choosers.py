"""A model that chooses among routes (an experiment, a policy) with routing settings of its own.

The route it chooses serves the request with that route's settings: a chooser's
`fallbacks`, `timeouts`, `max_attempts`, `hedge`, `strategy`, `fallbacks_on` and
`context_window_fallbacks` did nothing, and the config loaded without a word. An experiment
with `fallbacks: [b]` and `max_attempts: 1` over a failing variant made four attempts there and
answered 502; one with `timeouts: {total: 0.3}` waited 1.5 s for a slow upstream. Such a config
is refused now, naming the setting; set on the routes, the settings hold.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.test_cost_support import cost_proxy


def _config(up_url: str, chooser: dict[str, Any], route: dict[str, Any]) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": up_url}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o"}},
        "models": {
            "a": {"deployments": ["d"], **route},
            "x": {"experiment": {"variants": [{"route": "a", "percent": 100}]}, **chooser},
        },
    }


async def test_a_choosers_own_routing_settings_are_refused_and_its_routes_hold(
    start_upstream: Any, tmp_path: Path
) -> None:
    slow = await start_upstream(latency_ms=1500)
    settings = {"fallbacks": ["a"], "timeouts": {"total": 0.3}, "max_attempts": 1, "hedge": {"delay_ms": 100}}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(_config(slow.base_url, settings, {})))
    cmd = [sys.executable, "-m", "edgeroute", "check", str(path)]
    r = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout
    for field in settings:
        want = f"models.x.{field}: model 'x' chooses among routes (an experiment), which serve with their own {field}"
        assert want in r.stderr, r.stderr
    # Set on the route the experiment chooses, the total timeout holds.
    async with cost_proxy(_config(slow.base_url, {}, {"timeouts": {"total": 0.3}, "max_attempts": 1})) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        await client.close()
    assert e.value.status_code == 504, e.value
