"""Model selection end to end: cheapest-sufficient policies, rules first, explanations,
sticky A/B experiments, shadow traffic and feedback learning (with persisted state)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from tests.conftest import ProxyTestServer, Upstream
from tests.metrics_support import ledger_written, scrape

STRONG_OUT = "gpt-4-1106-preview"
WEAK_OUT = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def config(strong: Upstream | str, weak: Upstream | str, threshold: float = 0.7, **extra: Any) -> dict[str, Any]:
    """A strong and a weak model behind a policy route `auto` (upstreams, or their base URLs)."""
    urls = [u if isinstance(u, str) else u.base_url for u in (strong, weak)]
    cfg: dict[str, Any] = {
        "providers": {"s": {"base_url": urls[0]}, "w": {"base_url": urls[1]}},
        "deployments": {
            "big": {"provider": "s", "model": "gpt-4o", "price": {"input_per_mtok": 2.5, "output_per_mtok": 10}},
            "small": {
                "provider": "w",
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
            },
        },
        "models": {
            "strong": {"deployments": ["big"]},
            "weak": {"deployments": ["small"]},
            "auto": {
                "policy": {
                    "threshold": threshold,
                    "candidates": [{"route": "strong", "model": STRONG_OUT}, {"route": "weak", "model": WEAK_OUT}],
                }
            },
        },
    }
    cfg.update(extra)
    return cfg


def msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def served_by(client: openai.AsyncOpenAI, text: str, model: str = "auto", **kw: Any) -> tuple[str, Any]:
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=msg(text), **kw)
    return raw.headers["x-edgeroute-route"], raw


@pytest.fixture
async def pair(start_upstream) -> tuple[Upstream, Upstream]:
    return await start_upstream(), await start_upstream()


async def explain(proxy_url: str, text: str, model: str = "auto") -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy_url + "/v1/route/explain", json={"model": model, "messages": msg(text)}) as r,
    ):
        assert r.status == 200
        out: dict[str, Any] = await r.json()
        return out


async def test_cheapest_sufficient_policy(pair, start_proxy) -> None:
    strong, weak = pair
    # The weak model's predicted score for a greeting is far above 0.7; for a hard maths
    # problem it is lower. With the threshold between the two, each goes where it should.
    proxy = await start_proxy(config(strong, weak, threshold=0.7))
    easy = await explain(proxy.url, "hi there!")
    hard = await explain(proxy.url, "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?")
    assert easy["scores"][WEAK_OUT] > hard["scores"][WEAK_OUT]
    threshold = (easy["scores"][WEAK_OUT] + hard["scores"][WEAK_OUT]) / 2
    proxy = await start_proxy(config(strong, weak, threshold=threshold))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    route, raw = await served_by(client, "hi there!")
    assert route == "weak"
    assert "policy=auto: cheapest with predicted score" in raw.headers["x-edgeroute-explain"]
    assert "task=chat" in raw.headers["x-edgeroute-explain"]
    route, raw = await served_by(client, "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?")
    assert route == "strong"
    assert "task=math" in raw.headers["x-edgeroute-explain"] and "difficulty=" in raw.headers["x-edgeroute-explain"]
    await client.close()


async def test_a_rule_keeping_a_tag_to_some_deployments_steers_the_policy_to_them(pair, start_proxy) -> None:
    """`confidential` requests may only go to deployments tagged `privacy:high` (the strong
    model's). A greeting's cheapest sufficient candidate is the weak model, whose deployment
    the rule bars: the policy chooses among the candidates the rule allows, where it chose the
    weak route and then had no deployment to send to (a 503 for a request the strong one serves)."""
    strong, weak = pair
    cfg = config(strong, weak, threshold=0.5)
    cfg["deployments"]["big"]["tags"] = ["privacy:high"]
    cfg["rules"] = [
        {"name": "confidential", "when": {"tags": ["confidential"]}, "then": {"require_tags": ["privacy:high"]}}
    ]
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    route, _ = await served_by(client, "hi there!")
    assert route == "weak"  # untagged: the cheap candidate is sufficient
    route, raw = await served_by(client, "hi there!", extra_headers={"x-edgeroute-tags": "confidential"})
    assert route == "strong" and raw.headers["x-edgeroute-deployment"] == "big"
    assert "rule=confidential" in raw.headers["x-edgeroute-explain"]
    # A rule that bars every candidate's deployments still refuses, saying why.
    cfg["deployments"]["small"]["tags"] = ["gpu"]
    cfg["rules"][0]["then"] = {"require_tags": ["privacy:high", "gpu"]}  # no deployment has both
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await served_by(client, "hi there!", extra_headers={"x-edgeroute-tags": "confidential"})
    assert e.value.status_code == 503 and "required tags" in str(e.value.body), e.value.body
    await client.close()


async def test_policy_and_experiment_routes_with_a_ledger(pair, tmp_path: Path) -> None:
    """A config served from a file gets a ledger by default; policy and experiment models have
    no deployments of their own and must still start, serve and be costed against their routes."""

    from edgeroute import config as config_mod
    from edgeroute.server import create_app

    strong, weak = pair
    cfg = config(strong, weak, threshold=0.0)
    cfg["models"]["ab"] = {
        "experiment": {"variants": [{"route": "strong", "percent": 50}, {"route": "weak", "percent": 50}]}
    }
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "spend.db"), "flush_interval": 0.05}
    server = ProxyTestServer(
        create_app(config_mod.parse(cfg, str(tmp_path / "edgeroute.yaml")), str(tmp_path / "edgeroute.yaml"))
    )
    await server.start_server()
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
        for model in ("auto", "ab"):
            r = await client.chat.completions.create(model=model, messages=msg("hello"))  # type: ignore[arg-type]
            assert r.choices[0].message.content
        await ledger_written(f"http://127.0.0.1:{server.port}", 2)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.port}/admin/spend?by=model") as r:
            assert r.status == 200
            spend = await r.json()
        assert sum(row["requests"] for row in spend["rows"]) == 2, spend
        m = await scrape(f"http://127.0.0.1:{server.port}")
        assert m.value("edgeroute_ledger_written_total") == 2 and m.value("edgeroute_ledger_set_aside_total") == 0
        assert m.value("edgeroute_ledger_queue_depth") == 0
    finally:
        await server.close()


async def test_threshold_extremes(pair, start_proxy) -> None:
    strong, weak = pair
    lenient = await start_proxy(config(strong, weak, threshold=0.0))
    strict = await start_proxy(config(strong, weak, threshold=1.0))
    for text in ("hi", "Prove Fermat's little theorem.", "def f(x): return x"):
        assert (await explain(lenient.url, text))["route"] == "weak"  # everything is good enough
        assert (await explain(strict.url, text))["route"] == "strong"  # nothing is: the best scoring


async def test_rules_take_precedence_over_policy(pair, start_proxy) -> None:
    strong, weak = pair
    rules = [{"name": "code-to-strong", "when": {"tasks": ["code"]}, "then": {"route": "strong"}}]
    proxy = await start_proxy(config(strong, weak, threshold=0.0, rules=rules))
    out = await explain(proxy.url, "Write a python function that reverses a linked list in place.")
    assert out["task"] == "code" and out["rule"] == "code-to-strong" and out["route"] == "strong"
    assert (await explain(proxy.url, "hello, how are you today?"))["route"] == "weak"


async def test_task_rules_can_require_a_confident_prediction(pair, start_proxy) -> None:
    strong, weak = pair
    text = "Write a python function that reverses a linked list in place."
    probe = await explain((await start_proxy(config(strong, weak, threshold=0.0))).url, text)
    p = probe["task_confidence"]
    assert probe["task"] == "code" and 0.05 < p < 1.0, probe
    just_above = round(min(p + 0.01, (p + 1.0) / 2), 6)  # a confident model leaves little room below 1

    def rules(min_conf: float) -> list[dict[str, Any]]:
        when = {"tasks": ["code"], "min_task_confidence": min_conf}
        return [{"name": "sure-code", "when": when, "then": {"route": "strong"}}]

    below = await start_proxy(config(strong, weak, threshold=0.0, rules=rules(round(p - 0.01, 4))))
    out = await explain(below.url, text)
    assert out["rule"] == "sure-code" and out["route"] == "strong", out
    above = await start_proxy(config(strong, weak, threshold=0.0, rules=rules(just_above)))
    out = await explain(above.url, text)
    assert out["rule"] is None and out["route"] == "weak", out


def test_min_task_confidence_needs_tasks_and_a_probability(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from edgeroute.config import RuleWhen

    with pytest.raises(ValidationError, match="needs `tasks`"):
        RuleWhen.model_validate({"min_task_confidence": 0.5})
    with pytest.raises(ValidationError):
        RuleWhen.model_validate({"tasks": ["code"], "min_task_confidence": 1.5})
    assert RuleWhen.model_validate({"tasks": ["code"], "min_task_confidence": 0.5}).min_task_confidence == 0.5


async def test_explain_without_policy_shows_predictions(pair, start_proxy) -> None:
    strong, weak = pair
    proxy = await start_proxy(config(strong, weak))
    out = await explain(proxy.url, "Write a haiku about autumn leaves.", model="strong")
    assert out["route"] == "strong" and out["policy"] is None
    assert out["task"] == "creative_writing"
    assert set(out["scores"]) == {STRONG_OUT, WEAK_OUT}
    assert out["difficulty"] == pytest.approx(out["scores"][STRONG_OUT] - out["scores"][WEAK_OUT])


async def test_sticky_ab_experiment(pair, start_proxy) -> None:
    strong, weak = pair
    models = {
        "strong": {"deployments": ["big"]},
        "weak": {"deployments": ["small"]},
        "chat": {"experiment": {"variants": [{"route": "strong", "percent": 80}, {"route": "weak", "percent": 20}]}},
    }
    proxy = await start_proxy({**config(strong, weak), "models": models})
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    arms: dict[str, str] = {}
    for i in range(200):
        route, raw = await served_by(client, "hello", model="chat", user=f"user-{i}")
        arms[f"user-{i}"] = route
        assert f"variant={route}" in raw.headers["x-edgeroute-explain"]
    share = sum(1 for r in arms.values() if r == "weak") / len(arms)
    assert 0.1 < share < 0.3
    for user in list(arms)[:20]:  # sticky: the same user lands in the same arm again
        assert (await served_by(client, "again", model="chat", user=user))[0] == arms[user]
    await client.close()


async def test_shadow_traffic_is_recorded_never_returned(pair, start_proxy, tmp_path: Path) -> None:
    strong, weak = pair
    strong.options.record = weak.options.record = True
    cfg = config(strong, weak)
    cfg["models"]["weak"]["shadow"] = {"model": "strong", "percent": 100}
    cfg["request_log"] = {"log_content": "full"}  # the pairs' answers kept as the request log keeps content
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    route, raw = await served_by(client, "tell me a joke", model="weak")
    assert route == "weak" and raw.headers["x-edgeroute-deployment"] == "small"
    assert "gpt-4o-mini" in (raw.parse().choices[0].message.content or "")
    for _ in range(50):
        if any(r.shadow_of for r in proxy.recorder.records):
            break
        await asyncio.sleep(0.02)
    shadow = next(r for r in proxy.recorder.records if r.shadow_of)
    assert shadow.shadow_of == raw.headers["x-request-id"] and shadow.route == "strong" and shadow.cost_usd > 0
    assert len(strong.options.requests) == 1 and strong.options.requests[0]["body"].get("stream") is None
    from edgeroute.shadow_log import SHADOW_LOG

    pair_rec = proxy.app[SHADOW_LOG].pairs[-1]
    assert pair_rec["primary"]["route"] == "weak" and pair_rec["shadow"]["route"] == "strong"
    assert "gpt-4o" in pair_rec["shadow"]["answer"] and pair_rec["shadow"]["cost_usd"] > 0
    await client.close()


async def test_feedback_shifts_routing_and_persists(pair, start_proxy, tmp_path: Path) -> None:
    strong, weak = pair
    text = "Janet has 3 apples and buys 5 more. She gives 2 away. How many are left?"
    probe = await start_proxy(config(strong, weak))
    weak_score = (await explain(probe.url, text))["scores"][WEAK_OUT]
    state = tmp_path / "learning.json"
    # Just above the weak model's score: the strong model serves until feedback says the weak one is good.
    cfg = config(
        strong, weak, threshold=weak_score + 0.05, learning={"feedback": {"max_shift": 0.1, "state_path": str(state)}}
    )
    cfg["models"]["auto"]["policy"]["candidates"].reverse()
    cfg["models"]["weak-ab"] = {"experiment": {"variants": [{"route": "weak", "percent": 100}]}}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    route, raw = await served_by(client, text)
    assert route == "strong"
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/feedback", json={"request_id": "nope", "score": 1}) as r:
            assert r.status == 404
        async with s.post(
            proxy.url + "/v1/feedback", json={"request_id": raw.headers["x-request-id"], "score": 7}
        ) as r:
            assert r.status == 400
        # Users rate the weak model's maths answers highly (served through an experiment: a route
        # the client names itself teaches nothing).
        for _ in range(40):
            _, wraw = await served_by(client, text, model="weak-ab")
            async with s.post(
                proxy.url + "/v1/feedback", json={"request_id": wraw.headers["x-request-id"], "score": 1.0}
            ) as r:
                assert r.status == 200 and (await r.json())["task"] == "math"
    route, _ = await served_by(client, text)
    assert route == "weak"
    await proxy.server.close()  # graceful stop writes the learner's state
    saved = json.loads(state.read_text())
    assert any(p["task"] == "math" and p["route"] == "weak" and p["alpha"] > 40 for p in saved["posteriors"])
    again = await start_proxy(cfg)
    out = await explain(again.url, text)
    assert out["route"] == "weak"  # learned state survived the restart
    await client.close()


def test_route_cli_explains(tmp_path: Path) -> None:
    cfg = {
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeroute",
            "route",
            "--explain",
            "-c",
            str(path),
            "-m",
            "m",
            "Write a sonnet about the sea",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "deployment: d" in r.stdout and "task:       creative_writing" in r.stdout and "difficulty:" in r.stdout
