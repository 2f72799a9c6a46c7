"""`/metrics` read by prometheus_client's parser after real traffic through the proxy."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import simple_config
from tests.metrics_support import scrape

MSG = [{"role": "user", "content": "hello there"}]


async def _settled() -> None:
    await asyncio.sleep(0.05)  # metrics are observed on the loop turn after the answer


async def test_families_units_and_values_after_traffic(start_upstream, start_proxy) -> None:
    good = await start_upstream()
    bad = await start_upstream(fail_status=503)
    cfg = simple_config({"bad": bad, "good": good})
    cfg["deployments"]["d-bad"]["weight"] = 1000  # tried first, fails over to d-good
    cfg["keys"] = {
        "k1": {"token": "tok-research-1", "team": "research", "user": "alice"},
        "scraper": {"token": "tok-prometheus-1", "role": "viewer"},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-research-1", max_retries=0)
    await client.chat.completions.create(model="m", messages=MSG, user="raw-user-string-xyz")
    stream = await client.chat.completions.create(
        model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    async for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model-from-a-client", messages=MSG)
    await client.close()
    await _settled()

    m = await scrape(proxy.url, "tok-prometheus-1")
    assert m.value("edgeroute_requests_total", route="m", status="200", outcome="ok") == 2
    assert m.value("edgeroute_requests_total", route="", status="404", outcome="error") == 1
    # Latency in seconds: two answers from a loopback mock took well under a second each.
    assert m.value("edgeroute_request_duration_seconds_count", route="m") == 2
    assert 0 < m.value("edgeroute_request_duration_seconds_sum", route="m") < 2  # type: ignore[operator]
    assert m.value("edgeroute_request_duration_seconds_bucket", route="m", le="+Inf") == 2
    # Each request tried d-bad (503) then d-good: the first attempt, then a retry.
    assert m.value("edgeroute_attempts_total", deployment="d-bad", outcome="server_error", kind="first") == 2
    assert m.total("edgeroute_attempts_total", deployment="d-good", outcome="success") == 2
    assert m.total("edgeroute_retries_total", route="m") + m.total("edgeroute_fallbacks_total", route="m") == 2
    assert m.value("edgeroute_upstream_duration_seconds_count", deployment="d-good") == 2
    assert m.value("edgeroute_upstream_duration_seconds_count", deployment="d-bad") is None
    # Tokens and cost per route, deployment and team, from the records the ledger got.
    recs = proxy.recorder.records
    prompt = sum(a.usage.prompt_tokens for r in recs for a in r.attempts if a.usage and a.deployment == "d-good")
    assert m.value("edgeroute_tokens_total", route="m", deployment="d-good", team="research", kind="prompt") == prompt
    assert m.total("edgeroute_tokens_total", kind="completion") > 0
    cost = sum(r.cost_usd for r in recs)
    assert m.total("edgeroute_cost_usd_total", team="research") == pytest.approx(cost)
    # State read at scrape time.
    assert m.value("edgeroute_requests_in_flight") == 0
    assert m.value("edgeroute_requests_shed_total") == 0
    assert m.value("edgeroute_deployment_circuit_state", deployment="d-good") == 0
    assert m.value("edgeroute_deployment_in_flight", deployment="d-good") == 0
    assert 0 < m.value("edgeroute_deployment_latency_seconds", deployment="d-good") < 1  # type: ignore[operator]
    assert m.value("edgeroute_deployment_error_ratio", deployment="d-bad") > 0  # type: ignore[operator]
    # Bounded labels: no request id, no user, no model name a client made up, no token.
    assert "raw-user-string-xyz" not in m.text and "alice" not in m.text
    assert "no-such-model-from-a-client" not in m.text and "tok-research-1" not in m.text
    assert all(r.request_id not in m.text for r in recs)
    # Counters end in _total, durations are in seconds (base units), no milliseconds anywhere.
    for f in m.families.values():
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
        assert "_ms" not in f.name
    assert m.families["edgeroute_request_duration_seconds"].type == "histogram"
    assert m.families["edgeroute_upstream_time_to_first_token_seconds"].type == "histogram"


async def test_budget_gauges(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"k1": {"token": "tok-b-1", "team": "research"}}
    cfg["server"] = {"metrics_public": True}  # scraped without a key
    cfg["budgets"] = {"limits": [{"name": "research-monthly", "scope": "team", "match": "research", "limit_usd": 50}]}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-b-1", max_retries=0)
    await client.chat.completions.create(model="m", messages=MSG)
    await client.close()
    await _settled()
    m = await scrape(proxy.url)
    assert m.value("edgeroute_budget_limit_usd", budget="research-monthly") == 50
    spent = proxy.recorder.records[-1].cost_usd
    assert m.value("edgeroute_budget_used_usd", budget="research-monthly") == pytest.approx(spent, rel=1e-6)


async def test_shed_requests_are_counted(start_upstream, start_proxy) -> None:
    up = await start_upstream(latency_ms=300)
    proxy = await start_proxy(simple_config({"a": up}, server={"max_in_flight": 1}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    results = await asyncio.gather(
        *(client.chat.completions.create(model="m", messages=MSG) for _ in range(3)), return_exceptions=True
    )
    await client.close()
    shed = sum(isinstance(r, openai.APIStatusError) and r.status_code == 503 for r in results)
    assert shed >= 1
    m = await scrape(proxy.url)
    assert m.value("edgeroute_requests_shed_total") == shed
