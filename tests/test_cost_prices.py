"""Prices: the catalogue, overrides, windows; cost per request and per attempt."""

from __future__ import annotations

import calendar
import sqlite3
from pathlib import Path

import openai
import pytest

from edgeroute import config as config_mod
from edgeroute.accounting import Usage, cost_of
from edgeroute.config import ConfigError, Price
from edgeroute.cost import prices
from tests.test_cost_support import cost_proxy


def _cfg(price: object, model: str = "gpt-4o") -> dict[str, object]:
    return {
        "providers": {"a": {"base_url": "http://127.0.0.1:1"}},
        "deployments": {"d": {"provider": "a", "model": model, "price": price}},
        "models": {"m": {"deployments": ["d"]}},
    }


def test_catalogue_is_dated_and_sourced() -> None:
    cat = prices.catalogue()
    assert all(e["as_of"] and e["source"] for e in cat["models"].values())
    providers = {e["provider"] for e in cat["models"].values()}
    assert {"openai", "anthropic", "gemini", "mistral", "together", "groq"} <= providers


def test_deployment_price_from_catalogue_and_override() -> None:
    p = config_mod.parse(_cfg("catalogue")).deployments["d"].price
    assert (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) == (2.5, 10.0, 1.25)
    assert p.source is not None and p.source.startswith("catalogue:gpt-4o@")
    p = (
        config_mod.parse(_cfg({"catalogue": "claude-3-5-haiku-latest", "output_per_mtok": 3.0}, "x"))
        .deployments["d"]
        .price
    )
    assert (p.input_per_mtok, p.output_per_mtok) == (0.8, 3.0)
    p = config_mod.parse(_cfg({"catalogue": True}, "openai/gpt-4o-mini")).deployments["d"].price
    assert p.input_per_mtok == 0.15


def test_catalogue_errors_name_the_path() -> None:
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(_cfg("catalogue", "gpt4o"), "edge.yaml")
    assert "edge.yaml: deployments.d.price:" in str(ei.value) and "'gpt-4o'" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(
            _cfg({"input_per_mtok": 1, "windows": [{"start": "25:00", "end": "06:00", "multiplier": 0.5}]})
        )
    assert "deployments.d.price.windows[0].start" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(_cfg({"input_per_mtok": 1, "per_call": 1}))
    assert "deployments.d.price.per_call: unknown key" in str(ei.value)


def test_cost_with_cache_per_request_and_off_peak_window() -> None:
    price = Price(
        input_per_mtok=2.0,
        output_per_mtok=8.0,
        cached_input_per_mtok=0.5,
        per_request=0.001,
        windows=[{"start": "22:00", "end": "06:00", "multiplier": 0.5}],  # type: ignore[list-item]
    )
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=500_000, cached_tokens=200_000)
    noon = calendar.timegm((2026, 11, 27, 12, 0, 0))
    night = calendar.timegm((2026, 11, 27, 23, 30, 0))
    early = calendar.timegm((2026, 11, 28, 5, 59, 0))
    full = 0.8 * 2.0 + 0.2 * 0.5 + 0.5 * 8.0 + 0.001
    assert cost_of(price, usage, noon) == pytest.approx(full)
    assert cost_of(price, usage, night) == pytest.approx(full / 2)
    assert cost_of(price, usage, early) == pytest.approx(full / 2)
    # Reservations use the highest price a window can charge.
    top = prices.ceiling([price])
    assert top.cost(1000, 1000) == pytest.approx((2.0 + 8.0) * 1000 / 1e6 + 0.001)


async def test_stream_without_usage_is_costed_from_the_core_count(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(reply_words=30)
    db = tmp_path / "l.db"
    cfg = _cfg({"input_per_mtok": 1.0, "output_per_mtok": 2.0})
    # A server that cannot take stream_options is not asked for the usage (any other is: see
    # security/test_stream_usage_escape.py), so its stream comes without one.
    options = {"unsupported": ["stream_options"], "unsupported_params": "drop"}
    cfg["providers"] = {"a": {"base_url": up.base_url, "options": options}}
    cfg["ledger"] = {"path": str(db), "flush_interval": 0.1}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "tell me"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "tell me"}]
        )
        assert float(raw.headers["x-edgeroute-cost-usd"]) > 0
        await client.close()
    conn = sqlite3.connect(db)
    (p, c, est, cost, stream_flag) = conn.execute(
        "SELECT prompt_tokens, completion_tokens, usage_estimated, cost_usd, stream FROM spend ORDER BY id"
    ).fetchone()
    assert stream_flag == 1 and est == 1
    assert c > 10 and abs(c - len(text.split())) <= len(text.split())  # counted by the core's tokenizer
    assert cost == pytest.approx((p * 1.0 + c * 2.0) / 1e6)
    att = conn.execute("SELECT cost_usd FROM spend_attempts ORDER BY rowid").fetchall()
    assert len(att) == 2 and all(a[0] > 0 for a in att)


async def test_failed_and_retried_attempts_each_get_a_cost(start_upstream, tmp_path: Path) -> None:
    bad = await start_upstream(fail_status=500)
    good = await start_upstream()
    db = tmp_path / "l.db"
    cfg = {
        "providers": {"bad": {"base_url": bad.base_url}, "good": {"base_url": good.base_url}},
        "deployments": {
            "d-bad": {"provider": "bad", "model": "gpt-4o", "weight": 1000, "price": "catalogue"},
            "d-good": {"provider": "good", "model": "gpt-4o-mini", "weight": 1, "price": "catalogue"},
        },
        "models": {"m": {"deployments": ["d-bad", "d-good"]}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-deployment"] == "d-good"
        await client.close()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT deployment, outcome, cost_usd FROM spend_attempts ORDER BY n").fetchall()
    assert rows[0][:2] == ("d-bad", "server_error") and rows[0][2] == 0.0
    assert rows[-1][:2] == ("d-good", "success") and rows[-1][2] > 0
    (cost, baseline) = conn.execute("SELECT cost_usd, baseline_cost_usd FROM spend").fetchone()
    assert cost == pytest.approx(rows[-1][2])
    assert baseline > cost  # the same tokens on gpt-4o


async def test_a_lost_hedge_is_costed_too(start_upstream, tmp_path: Path) -> None:
    slow = await start_upstream(latency_ms=400)
    fast = await start_upstream()
    db = tmp_path / "l.db"
    cfg = {
        "providers": {"slow": {"base_url": slow.base_url}, "fast": {"base_url": fast.base_url}},
        "deployments": {
            "d-slow": {"provider": "slow", "model": "gpt-4o", "weight": 1000, "price": "catalogue"},
            "d-fast": {"provider": "fast", "model": "gpt-4o", "weight": 1, "price": "catalogue"},
        },
        "models": {"m": {"deployments": ["d-slow", "d-fast"], "hedge": {"delay_ms": 50, "budget_percent": 100}}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
    }
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-edgeroute-hedged"] == "true" and raw.headers["x-edgeroute-deployment"] == "d-fast"
        await client.close()
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT deployment, outcome, hedge, prompt_tokens, cost_usd, completion_tokens FROM spend_attempts"
    ).fetchall()
    by = {r[0]: r for r in rows}
    assert by["d-slow"][1] == "cancelled" and by["d-slow"][3] > 0 and by["d-slow"][4] > 0  # the prompt was billed
    assert by["d-fast"][1] == "success" and by["d-fast"][2] == 1 and by["d-fast"][5] > 0
    # The slow upstream goes on to write (and bill) its whole answer: estimated as the winner's.
    assert by["d-slow"][5] == by["d-fast"][5] and by["d-slow"][4] == pytest.approx(by["d-fast"][4])
    (total,) = conn.execute("SELECT cost_usd FROM spend").fetchone()
    assert total == pytest.approx(by["d-slow"][4] + by["d-fast"][4])


async def test_price_windows_steer_lowest_cost_routing(start_upstream, start_proxy) -> None:
    """An off-peak window that makes the pricier deployment cheaper now moves lowest-cost traffic to it."""
    from tests.conftest import simple_config

    a, b = await start_upstream(), await start_upstream()
    cfg = simple_config({"a": a, "b": b})
    cfg["deployments"]["d-b"]["price"] = {"input_per_mtok": 4, "output_per_mtok": 8}
    cfg["models"]["m"]["strategy"] = "lowest_cost"
    proxy = await start_proxy(cfg)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    import aiohttp

    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/route/explain", json=body) as r:
        assert (await r.json())["deployment"] == "d-a"
    # The same prices with a window over the whole day at a tenth of the price for `d-b`.
    cfg["deployments"]["d-b"]["price"]["windows"] = [{"start": "00:00", "end": "24:00", "multiplier": 0.1}]
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/route/explain", json=body) as r:
        assert (await r.json())["deployment"] == "d-b"
