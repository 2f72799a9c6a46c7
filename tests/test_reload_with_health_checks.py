"""Config reload with active health checks: a probe a reload adds runs, one it removes stops.

The probe loops were started once, from the providers of the config at start: a reload that
added a `health_check` never probed (a dead provider stayed in rotation until user requests
found it), and one that removed a provider left its loop failing with a traceback each interval.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import eventually, simple_config


async def _apply(proxy: Any, cfg: dict[str, Any]) -> None:
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)


async def test_a_health_check_a_reload_adds_probes_and_one_it_removes_stops(
    start_upstream: Any, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    up, other = await start_upstream(), await start_upstream()
    cfg = simple_config({"a": up, "b": other}, health={"base_ejection_ms": 600_000})
    proxy = await start_proxy(cfg)  # no probes at start

    async def circuit() -> str:
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/deployments") as r:
            return str({d["name"]: d for d in (await r.json())["deployments"]}["d-a"]["circuit"])

    cfg["providers"]["a"]["health_check"] = {"interval": 0.05, "timeout": 1}
    await _apply(proxy, cfg)
    up.options.fail_status = 503  # an outage: the probe sees it before any user request does

    async def ejected() -> bool:
        return await circuit() == "open"

    await eventually(ejected, "d-a ejected by the probe the reload added", within=10)

    up.options.fail_status = None
    del cfg["providers"]["a"]
    cfg["deployments"].pop("d-a")
    cfg["models"]["m"]["deployments"] = ["d-b"]
    caplog.set_level(logging.ERROR, logger="edgeroute.health")
    await _apply(proxy, cfg)
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/healthz") as r:
        assert r.status == 200
    await eventually(_quiet_for(caplog), "a second of probes without errors", within=10)


def _quiet_for(caplog: pytest.LogCaptureFixture) -> Any:
    """A probe that is true once a few intervals passed with no probe error logged."""
    since = time.monotonic()

    async def quiet() -> bool:
        assert not [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
        return time.monotonic() - since > 1.5

    return quiet
