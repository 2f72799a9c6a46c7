"""Residency: a key (or its team) bound to a region reaches no other region's upstream —
on the first try, retries, fallbacks (by route and by error class), hedges, rules, streams
and shadow traffic. The disallowed upstreams are healthy and record every request, so a
leak would succeed and be seen."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from edgeroute import config as config_mod
from edgeroute.governance import residency
from tests.conftest import Upstream
from tests.test_governance_keys import _proxy

EU_KEY, US_KEY, ADMIN = "tok-eu", "tok-free", "tok-admin"


async def _world(start_upstream: Any) -> tuple[dict[str, Upstream], dict[str, Any]]:
    ups = {
        "eu-down": await start_upstream(fail_status=500, record=True),
        "eu-slow": await start_upstream(latency_ms=400, record=True),
        "eu-ok": await start_upstream(record=True),
        "us-1": await start_upstream(record=True),
        "us-2": await start_upstream(record=True),
    }
    region = {"eu-down": "eu", "eu-slow": "eu", "eu-ok": "eu", "us-1": "us", "us-2": "us"}
    cfg: dict[str, Any] = {
        "providers": {n: {"base_url": u.base_url, "api_key": f"key-{n}"} for n, u in ups.items()},
        "deployments": {
            f"d-{n}": {"provider": n, "model": "gpt-4o-mini", "tags": [f"region:{region[n]}"], "weight": 1} for n in ups
        },
        "models": {
            # us-1 first by weight, a failing EU deployment, then fallbacks by route and by error class
            "m": {
                "deployments": ["d-us-1", "d-eu-down"],
                "fallbacks": ["fb"],
                "fallbacks_on": {"server_error": ["us-only"]},
            },
            "fb": {"deployments": ["d-us-2", "d-eu-ok"]},
            "us-only": {"deployments": ["d-us-2"]},
            "hedged": {
                "deployments": ["d-eu-slow", "d-us-1", "d-eu-ok"],
                "hedge": {"delay_ms": 30, "budget_percent": 100},
            },
            "shadowed": {"deployments": ["d-eu-ok"], "shadow": {"model": "fb", "percent": 100}},
            "shadowed-us": {"deployments": ["d-eu-ok"], "shadow": {"model": "us-only", "percent": 100}},
        },
        "rules": [{"name": "batch-cheap", "priority": 5, "when": {"tags": ["batch"]}, "then": {"route": "fb"}}],
        "keys": {
            "eu": {"token": EU_KEY, "team": "research"},
            "free": {"token": US_KEY},
            "root": {"token": ADMIN, "role": "admin"},
        },
        "governance": {"managed_keys": True, "residency": {"teams": {"research": "eu"}}},
    }
    cfg["deployments"]["d-us-1"]["weight"] = 1000
    return ups, cfg


def _us_requests(ups: dict[str, Upstream]) -> int:
    return len(ups["us-1"].options.requests) + len(ups["us-2"].options.requests)


async def _ask(url: str, token: str, model: str, tags: str | None = None, stream: bool = False) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        hdrs = {"x-edgeroute-tags": tags} if tags else None
        msgs: Any = [{"role": "user", "content": "where am I served?"}]
        if stream:
            out = []
            async for chunk in await client.chat.completions.create(
                model=model, messages=msgs, stream=True, extra_headers=hdrs
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    out.append(chunk.choices[0].delta.content)
            return "".join(out)
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=msgs, extra_headers=hdrs)
        return raw.headers["x-edgeroute-deployment"]
    finally:
        await client.close()


async def test_residency_holds_on_every_path(start_upstream) -> None:
    ups, cfg = await _world(start_upstream)
    async with _proxy(cfg) as url:
        # The control: without residency the same requests go to the US (so the test can fail).
        assert await _ask(url, US_KEY, "m") == "d-us-1"
        assert _us_requests(ups) == 1
        ups["us-1"].options.requests.clear()

        for _ in range(5):  # first try, retry and fallbacks: the EU deployment fails, the EU fallback serves
            assert await _ask(url, EU_KEY, "m") == "d-eu-ok"
            assert await _ask(url, EU_KEY, "m", stream=True)
        assert await _ask(url, EU_KEY, "m", tags="batch") == "d-eu-ok"  # a rule's route, confined
        assert await _ask(url, EU_KEY, "hedged") in ("d-eu-slow", "d-eu-ok")  # the hedge stays in the EU
        assert await _ask(url, EU_KEY, "shadowed") == "d-eu-ok"
        assert await _ask(url, EU_KEY, "shadowed-us") == "d-eu-ok"
        await asyncio.sleep(0.5)  # shadows run in the background
        assert ups["eu-ok"].options.requests, "the EU upstream served"
        assert len(ups["eu-down"].options.requests) >= 10, "the failing EU deployment was tried"
        assert _us_requests(ups) == 0, "a request bound to the EU reached a US upstream"

        # A client cannot claim or shed a region with marker tags.
        assert await _ask(url, US_KEY, "m", tags="@residency:eu") == "d-us-1"

        # A managed key of the research team inherits the team's residency.
        status, made = await _admin(url, {"team": "research"})
        assert status == 201 and made["residency"] is None
        assert await _ask(url, made["secret"], "m") == "d-eu-ok"
        assert _us_requests(ups) == 1  # only the control request above


async def test_region_without_deployments_is_refused(start_upstream) -> None:
    ups, cfg = await _world(start_upstream)
    cfg["governance"]["residency"]["teams"]["research"] = "ap"
    async with _proxy(cfg) as url:
        with pytest.raises(openai.PermissionDeniedError, match="region 'ap'"):
            await _ask(url, EU_KEY, "m")
        status, err = await _admin(url, {"residency": "ap"})
        assert status == 400 and "region:ap" in err["error"]["message"]
    assert _us_requests(ups) == 0


async def test_only_eu_route_with_no_eu_deployment_is_503(start_upstream) -> None:
    ups, cfg = await _world(start_upstream)
    async with _proxy(cfg) as url:
        with pytest.raises(openai.InternalServerError) as e:
            await _ask(url, EU_KEY, "us-only")
        assert e.value.status_code == 503
    assert _us_requests(ups) == 0


def test_rule_folding_keeps_rule_order() -> None:
    cfg = config_mod.parse(
        {
            "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
            "deployments": {
                "eu": {"provider": "p", "model": "x", "tags": ["region:eu"]},
                "us": {"provider": "p", "model": "x", "tags": ["region:us"]},
            },
            "models": {"m": {"deployments": ["eu", "us"]}},
            "rules": [
                {"name": "low", "priority": -3, "when": {"keywords": ["x"]}, "then": {"route": "m"}},
                {"name": "high", "priority": 9, "when": {"tags": ["a", "b"]}, "then": {"exclude_tags": ["region:us"]}},
            ],
            "governance": {"residency": {}},
        }
    )
    eff = residency.effective(cfg)
    ordered = sorted(eff.rules, key=lambda r: -r.priority)
    names = [r.name for r in ordered]
    assert names[-2:] == ["high", "low"]  # the originals come last, in their order
    assert names.index("high@residency:eu") < names.index("low@residency:eu") < names.index("residency:eu")
    high_eu = next(r for r in eff.rules if r.name == "high@residency:eu")
    assert high_eu.when.tags == ["a@residency:eu", "b@residency:eu"]
    assert high_eu.then.require_tags == ["region:eu"] and high_eu.then.exclude_tags == ["region:us"]
    assert residency.effective(eff) is eff


async def _admin(url: str, fields: dict[str, Any]) -> tuple[int, Any]:
    from tests.governance_support import call

    return await call("POST", url + "/admin/keys", ADMIN, json=fields)


async def test_cached_answers_stay_in_the_region(start_upstream) -> None:
    ups, cfg = await _world(start_upstream)
    cfg["models"]["cached"] = {
        "deployments": ["d-us-1", "d-eu-ok"],
        "cache": {"scope": "global", "ttl": 300, "stale_if_error": 300},
    }
    cfg["deployments"]["d-us-1"]["weight"] = 1000
    async with _proxy(cfg) as url:

        async def ask(token: str) -> tuple[str, str]:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="cached", messages=[{"role": "user", "content": "same question"}], temperature=0
                )
                return raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-cache", "")
            finally:
                await client.close()

        assert await ask(US_KEY) == ("d-us-1", "miss")
        assert await ask(US_KEY) == ("d-us-1", "hit")  # the control: the entry is shared
        dep, label = await ask(EU_KEY)
        assert dep == "d-eu-ok" and label != "hit"  # never the US answer
        assert len(ups["eu-ok"].options.requests) == 1
