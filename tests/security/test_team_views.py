"""A team's own budgets and its stats by model, deployment, provider and rule, for its keys.

Before, a team-bound key got a 403 from `GET /admin/budgets` (a gateway-wide view) and from
`GET /admin/stats?group_by=model` (and deployment, provider, rule: the rollups kept one
dimension per row, so only a team's totals could be told apart). Now its budgets are those
that apply to its team, with their figures (its team budget, its keys'), and those that
constrain it while counting every team's spend (global, model), figures withheld; its stats
group by model, deployment, provider and rule with its own requests alone. Another team's
name, figures and rows never appear; `team=` naming another team, or no team at all, is a
404; a key bound to no team sees everything as before, and one team's view with `team=`.

Through the real app, SQLite and PostgreSQL, with the official OpenAI SDK as client. Every
figure is known: the mock answers `max_tokens` words to a prompt of 3 words (10 prompt
tokens), priced 1 USD per million prompt tokens and 2 per million completion tokens."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually
from tests.security.governed import ROOT, call
from tests.security.test_tenant_isolation import _ledger
from tests.test_cost_support import cost_proxy

PROMPT_TOKENS = 10  # 3 + 4 per message + 3 words


def _cost(completion: int) -> float:
    return PROMPT_TOKENS * 1e-6 + completion * 2e-6


# (team, model, max_tokens) of each request, A and B interleaved. Model m1 is served by
# deployment d-x (provider px), m2 by d-y (provider py); rule `via-x` decides m1's requests.
REQUESTS = (("a", "m1", 4), ("b", "m2", 1), ("a", "m1", 6), ("b", "m1", 7), ("a", "m2", 2), ("b", "m2", 3))


@dataclass
class Gateway:
    s: aiohttp.ClientSession
    url: str
    teams: dict[str, str]  # "a"/"b" -> the run's team name
    made: dict[str, dict[str, Any]]

    def token(self, name: str) -> str:
        return str(self.made[name]["secret"])

    async def get(self, path: str, token: str) -> tuple[int, Any]:
        return await call(self.s, "GET", self.url + path, token)


def _config(up_x: Any, up_y: Any, tmp_path: Path, backend: str, team_a: str, team_b: str) -> dict[str, Any]:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    return {
        "providers": {
            "px": {"base_url": up_x.base_url, "api_key": "key-x"},
            "py": {"base_url": up_y.base_url, "api_key": "key-y"},
        },
        "deployments": {
            "d-x": {"provider": "px", "model": "gpt-4o-mini", "price": price},
            "d-y": {"provider": "py", "model": "gpt-4o-mini", "price": price},
        },
        "models": {"m1": {"deployments": ["d-x"]}, "m2": {"deployments": ["d-y"]}},
        "rules": [{"name": "via-x", "when": {"models": ["m1"]}, "then": {"deployments": ["d-x"]}}],
        "ledger": _ledger(backend, tmp_path),
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "rate_limits": {"models": {"m1": {"rpm": 10_000}}},
        "budgets": {
            "limits": [
                {"name": "per-team", "scope": "team", "limit_usd": 10},
                {"name": "b-only", "scope": "team", "match": team_b, "limit_usd": 5},
                {"name": "gateway", "scope": "global", "limit_usd": 100},
                {"name": "m1-cap", "scope": "model", "match": "m1", "limit_usd": 50},
                {"name": "per-user", "scope": "user", "limit_usd": 1},
            ]
        },
    }


@contextlib.asynccontextmanager
async def gateway(start_upstream: Any, tmp_path: Path, backend: str) -> AsyncIterator[Gateway]:
    run = uuid.uuid4().hex[:8]
    teams = {"a": f"a-{run}", "b": f"b-{run}"}
    cfg = _config(await start_upstream(), await start_upstream(), tmp_path, backend, teams["a"], teams["b"])
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        made: dict[str, dict[str, Any]] = {}
        for name, role, team, extra in (
            ("a-admin", "admin", "a", {}),
            ("a-viewer", "viewer", "a", {}),
            ("a-svc", "service", "a", {"budget_usd": 20, "rpm": 500}),
            ("b-admin", "admin", "b", {}),
            ("b-svc", "service", "b", {"budget_usd": 30, "rpm": 600}),
        ):
            body = {"name": name, "role": role, "team": teams[team], **extra}
            status, made[name] = await call(s, "POST", proxy.url + "/admin/keys", ROOT, body)
            assert status == 201, made[name]
        g = Gateway(s, proxy.url, teams, made)
        for team, model, max_tokens in REQUESTS:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=g.token(f"{team}-svc"), max_retries=0)
            try:
                got = await client.chat.completions.create(
                    model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "one two three"}]
                )
            finally:
                await client.close()
            assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (
                PROMPT_TOKENS,
                max_tokens,
            )

        async def logged() -> bool:
            status, body = await g.get("/admin/stats?since=1h&group_by=team", ROOT)
            seen = {r["group"]: r["requests"] for r in body["rows"]} if status == 200 else {}
            return seen.get(teams["a"]) == 3 and seen.get(teams["b"]) == 3

        await eventually(logged, "the six requests in the stats")
        yield g


def _want(team: str, by: str) -> dict[str | None, tuple[int, int, int, float]]:
    """group -> (requests, prompt tokens, completion tokens, cost) of one team's requests."""
    on_x = {"model": "m1", "deployment": "d-x", "provider": "px", "rule": "via-x"}  # m2's: m2, d-y, py, no rule
    on_y = {"model": "m2", "deployment": "d-y", "provider": "py", "rule": None}
    out: dict[str | None, list[Any]] = {}
    for t, model, n in REQUESTS:
        if t == team:
            r = out.setdefault((on_x if model == "m1" else on_y)[by], [0, 0, 0, 0.0])
            r[0] += 1
            r[1] += PROMPT_TOKENS
            r[2] += n
            r[3] += _cost(n)
    return {k: (v[0], v[1], v[2], round(v[3], 8)) for k, v in out.items()}


def _rows(body: dict[str, Any]) -> dict[str | None, tuple[int, int, int, float]]:
    """group -> its figures, added up over the time buckets (an hour's may split the run in two)."""
    out: dict[str | None, list[Any]] = {}
    for r in body["rows"]:
        sums = out.setdefault(r["group"], [0, 0, 0, 0.0])
        for i, f in enumerate(("requests", "prompt_tokens", "completion_tokens", "cost_usd")):
            sums[i] += r[f]
    return {k: (v[0], v[1], v[2], round(v[3], 8)) for k, v in out.items()}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_team_keys_get_their_own_stats_by_model_deployment_provider_and_rule(
    start_upstream: Any, tmp_path: Path, backend: str
) -> None:
    async with gateway(start_upstream, tmp_path, backend) as g:
        a, b = g.teams["a"], g.teams["b"]
        for by in ("model", "deployment", "provider", "rule"):
            for token, team in ((g.token("a-admin"), "a"), (g.token("a-viewer"), "a"), (g.token("b-admin"), "b")):
                for q in (f"group_by={by}", f"group_by={by}&team={g.teams[team]}", f"group_by={by}&bucket=3600"):
                    status, body = await g.get(f"/admin/stats?since=1h&{q}", token)
                    assert status == 200, body
                    assert _rows(body) == _want(team, by), (by, team, q, body)
                    assert body["team"] == g.teams[team] and body["totals"]["requests"] == 3
            # A key bound to no team: one team's with team=, every team's without.
            status, body = await g.get(f"/admin/stats?since=1h&group_by={by}&team={a}", ROOT)
            assert status == 200 and _rows(body) == _want("a", by), body
        status, body = await g.get("/admin/stats?since=1h&group_by=model", ROOT)
        assert status == 200 and "team" not in body
        everyone = {r["group"]: r["requests"] for r in body["rows"]}
        assert everyone["m1"] >= 3 and everyone["m2"] >= 3  # (PostgreSQL: other tests' too)
        # Grouping by key spans every team's rows: still refused to a team's key.
        status, body = await g.get("/admin/stats?since=1h&group_by=key", g.token("a-admin"))
        assert status == 403 and body["error"]["param"] == "group_by", body
        # Another team, or a team nobody uses: the same 404, whoever asks.
        nobody = f"nobody-{a}"
        for token, team in ((g.token("a-admin"), b), (g.token("a-viewer"), nobody), (ROOT, nobody)):
            status, body = await g.get(f"/admin/stats?since=1h&group_by=model&team={team}", token)
            assert (status, body["error"]["code"]) == (404, "team_not_found"), body
            assert body["error"]["message"] == f"No team {team!r} is known to this gateway."
            assert b not in str(body) or team == b


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_team_keys_read_the_budgets_that_apply_to_their_team(
    start_upstream: Any, tmp_path: Path, backend: str
) -> None:
    async with gateway(start_upstream, tmp_path, backend) as g:
        a, b = g.teams["a"], g.teams["b"]
        a_svc, b_svc = g.made["a-svc"]["id"], g.made["b-svc"]["id"]
        spent = {t: round(sum(_cost(n) for team, _, n in REQUESTS if team == t), 8) for t in ("a", "b")}

        async def settled() -> dict[str, Any]:
            _, body = await g.get("/admin/budgets", ROOT)
            got = {(e["name"], e["match"]): e["spent_usd"] for e in body["budgets"]}
            want = {("per-team", a): spent["a"], ("per-team", b): spent["b"], (f"key:{a_svc}", a_svc): spent["a"]}
            return body if all(got.get(k) == v for k, v in want.items()) else {}

        everything = await eventually(settled, "every request settled into the budgets")
        # A key bound to no team: every budget with its figures, as before.
        names = {(e["name"], e["match"]) for e in everything["budgets"]}
        assert {("b-only", b), ("gateway", "*"), ("m1-cap", "m1"), (f"key:{b_svc}", b_svc)} <= names
        assert all("shared" not in e and e["spent_usd"] is not None for e in everything["budgets"])
        assert "team" not in everything

        for token in (g.token("a-admin"), g.token("a-viewer")):
            for path in ("/admin/budgets", f"/admin/budgets?team={a}"):
                status, body = await g.get(path, token)
                assert status == 200 and body["team"] == a, body
                got = {(e["name"], e["match"]): e for e in body["budgets"]}
                assert set(got) == {("per-team", a), (f"key:{a_svc}", a_svc), ("gateway", "*"), ("m1-cap", "m1")}
                mine = got[("per-team", a)]
                assert (mine["spent_usd"], mine["limit_usd"], mine["shared"]) == (spent["a"], 10, False)
                assert mine["percent"] == round(100 * spent["a"] / 10, 3)
                key = got[(f"key:{a_svc}", a_svc)]
                assert (key["spent_usd"], key["limit_usd"], key["shared"]) == (spent["a"], 20, False)
                for shared in (got[("gateway", "*")], got[("m1-cap", "m1")]):  # every team's spend: no figures
                    assert shared["shared"] is True and shared["limit_usd"] in (100, 50)
                    assert [shared[f] for f in ("spent_usd", "reserved_usd", "percent", "projected_usd")] == [None] * 4
                limits = {(r["scope"], r["name"]): r for r in body["rate_limits"]}
                assert set(limits) == {("key", a_svc), ("model", "m1")}, body["rate_limits"]
                assert limits[("key", a_svc)]["rpm_limit"] == 500 and limits[("key", a_svc)]["rpm_used"] is not None
                assert limits[("model", "m1")]["rpm_used"] is None and limits[("model", "m1")]["rpm_limit"] == 10_000
                text = str(body)
                assert b not in text and b_svc not in text and "b-only" not in text
                assert str(spent["a"] + spent["b"]) not in text  # no aggregate of both teams
            status, root_view = await g.get(f"/admin/budgets?team={a}", ROOT)
            assert status == 200 and root_view["budgets"] == body["budgets"]

        status, body = await g.get("/admin/budgets", g.token("b-admin"))
        got = {(e["name"], e["match"]): e for e in body["budgets"]}
        assert set(got) == {("per-team", b), ("b-only", b), (f"key:{b_svc}", b_svc), ("gateway", "*"), ("m1-cap", "m1")}
        assert got[("b-only", b)]["spent_usd"] == spent["b"] and a not in str(body)

        nobody = f"nobody-{a}"
        for token, team in ((g.token("a-admin"), b), (g.token("a-viewer"), nobody), (ROOT, nobody)):
            status, body = await g.get(f"/admin/budgets?team={team}", token)
            assert (status, body["error"]["code"]) == (404, "team_not_found"), body
            assert body["error"]["message"] == f"No team {team!r} is known to this gateway."
