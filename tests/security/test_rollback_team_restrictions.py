"""A rollback below admin cannot lift a team's routing restriction or loosen a rate limit.

The rollback guard (`weakening.weakenings`) held residency, PII rules and rejecting rules, but
not a rule that confines a team's requests by hand: `when.teams: [legal]` with
`then.require_tags: [eu]` (or `then.deployments`, `then.route`). An operator's rollback to a
version from before an admin added one sent the team's prompts to every deployment again; one
from before a rate limit was tightened (or the output reserved for a request without
`max_tokens` raised) loosened it. Each now needs an admin key: 403 `permission_denied` naming
what, nothing changed, audited as refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import yaml

from edgeroute.governance.weakening import weakenings
from tests.conftest import simple_config
from tests.governance_support import call, served_file, write_config

ROOT, OP, LEGAL = "tok-root-0123456789", "tok-oper-0123456789", "tok-legal-0123456789"
TEAM_RULE = {"name": "legal-stays-in-eu", "when": {"teams": ["legal"]}, "then": {"require_tags": ["eu"]}}
USER: Any = [{"role": "user", "content": "hello"}]


def _open(up: Any) -> dict[str, Any]:
    """Version 1: no team restriction, a loose per-key rate limit."""
    cfg = simple_config({"a": up, "b": up})
    cfg["deployments"]["d-b"]["tags"] = ["eu"]
    cfg["keys"] = {
        "root": {"token": ROOT, "role": "admin"},
        "op": {"token": OP, "role": "operator"},
        "legal-app": {"token": LEGAL, "team": "legal"},
    }
    cfg["rate_limits"] = {"per_key": {"rpm": 10_000}}
    return cfg


async def _deployment(url: str, token: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=USER)
        return raw.headers["x-edgeroute-deployment"]
    finally:
        await client.close()


async def test_an_operator_cannot_lift_a_teams_restriction_or_a_rate_limit(start_upstream: Any, tmp_path: Path) -> None:
    path = tmp_path / "edgeroute.yaml"
    cfg = _open(await start_upstream())
    async with served_file(path, cfg) as url:  # version 1
        assert {await _deployment(url, LEGAL) for _ in range(12)} == {"d-a", "d-b"}
        restricted = copy.deepcopy(cfg)
        restricted["rules"] = [TEAM_RULE]
        restricted["rate_limits"] = {"per_key": {"rpm": 600}}
        write_config(path, restricted)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 2
        assert {await _deployment(url, LEGAL) for _ in range(6)} == {"d-b"}

        status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": 1})
        assert status == 403, body
        err = body["error"]
        assert err["code"] == "permission_denied" and "role 'admin'" in err["message"], err
        assert "restriction rule 'legal-stays-in-eu' removed or changed" in err["message"], err
        assert "rate_limits.per_key.rpm loosened" in err["message"], err
        _, body = await call("GET", url + "/admin/config", ROOT)
        assert body["version"] == 2 and body["config"]["rules"][0]["name"] == "legal-stays-in-eu"
        assert "legal-stays-in-eu" in path.read_text()
        assert {await _deployment(url, LEGAL) for _ in range(6)} == {"d-b"}
        _, body = await call("GET", url + "/admin/audit?action=config.rollback_refused", ROOT)
        refused = body["entries"][0]
        assert refused["actor"] == "op" and refused["after"]["needs"] == "admin", refused
        assert refused["after"]["weakens"] == [
            "restriction rule 'legal-stays-in-eu' removed or changed",
            "rate_limits.per_key.rpm loosened",
        ], refused

        # An admin may: its choice.
        status, body = await call("POST", url + "/admin/config/rollback", ROOT, json={"version": 1})
        assert status == 200, body
        assert "legal-stays-in-eu" not in path.read_text()
        assert {await _deployment(url, LEGAL) for _ in range(12)} == {"d-a", "d-b"}


def _weaker(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return weakenings(yaml.safe_dump(before), yaml.safe_dump(after))


def test_what_counts_as_a_restriction() -> None:
    base = _open(SimpleNamespace(base_url="http://127.0.0.1:9"))
    base["models"]["legal-only"] = {"deployments": ["d-b"]}
    pinned = {"name": "legal-on-d-b", "when": {"teams": ["legal"]}, "then": {"deployments": ["d-b"]}}
    routed = {"name": "interns-local", "when": {"roles": ["intern"]}, "then": {"route": "legal-only"}}
    excluding = {"name": "no-external", "then": {"exclude_tags": ["external"]}}
    tagged = {"name": "confidential-on-d-b", "when": {"tags": ["confidential"]}, "then": {"deployments": ["d-b"]}}
    for rule in (TEAM_RULE, pinned, routed, excluding, tagged):
        ruled = copy.deepcopy(base)
        ruled["rules"] = [rule]
        assert _weaker(ruled, base) == [f"restriction rule '{rule['name']}' removed or changed"], rule
        assert _weaker(base, ruled) == []  # adding one is an operator's
        ahead = copy.deepcopy(ruled)
        ahead["rules"].insert(0, {"name": "all-cheap", "priority": 5, "then": {"route": "m"}})
        assert _weaker(ruled, ahead) == [f"a rule put ahead of restriction rule '{rule['name']}'"], rule
    # A model's requests, or every request, kept on given deployments or a route reads as residency
    # by hand (red8 B2): the text cannot tell it from a preference, so an admin removes it.
    model_pin = {"name": "m-stays-in-eu", "when": {"models": ["m"]}, "then": {"deployments": ["d-b"]}}
    everything = {"name": "all-in-eu", "then": {"deployments": ["d-b"]}}
    for rule in (model_pin, everything, {"name": "cheap", "then": {"route": "m"}}):
        ruled = copy.deepcopy(base)
        ruled["rules"] = [rule]
        assert _weaker(ruled, base) == [f"restriction rule '{rule['name']}' removed or changed"], rule
    # A rule that only picks a strategy or a priority class sends no request elsewhere: an operator's.
    for rule in ({"name": "fast", "then": {"strategy": "fastest"}}, {"name": "bulk", "then": {"priority": "low"}}):
        ruled = copy.deepcopy(base)
        ruled["rules"] = [rule]
        assert _weaker(ruled, base) == [], rule

    # The tags and deployments a restriction rule relies on are guarded as a PII rule's are.
    ruled = copy.deepcopy(base)
    ruled["rules"] = [TEAM_RULE]
    tagged = copy.deepcopy(ruled)
    tagged["deployments"]["d-a"]["tags"] = ["eu"]
    assert _weaker(ruled, tagged) == ["deployments.d-a gains tag eu"]
    moved = copy.deepcopy(ruled)
    moved["providers"]["b"]["base_url"] = "https://api.elsewhere.example"
    assert _weaker(ruled, moved) == ["deployments.d-b (tagged eu) changes its base_url"]
    via_route = copy.deepcopy(base)
    via_route["rules"] = [routed]
    widened = copy.deepcopy(via_route)
    widened["models"]["legal-only"]["deployments"].append("d-a")
    assert _weaker(via_route, widened) == ["deployments.d-a joins the route of a restriction rule"]
    moved = copy.deepcopy(via_route)
    moved["providers"]["b"]["base_url"] = "https://api.elsewhere.example"
    assert _weaker(via_route, moved) == ["deployments.d-b (named by a restriction rule) changes its base_url"]

    # Rate limits, and the output held for a request without max_tokens.
    limited = copy.deepcopy(base)
    limited["rate_limits"] = {"per_key": {"rpm": 60, "tpm": 1000}, "models": {"m": {"max_parallel": 2}}}
    looser = copy.deepcopy(limited)
    looser["rate_limits"] = {"per_key": {"rpm": 120, "tpm": 1000}}
    assert _weaker(limited, looser) == [
        "rate_limits.per_key.rpm loosened",
        "rate_limits.models.m.max_parallel loosened",
    ]
    assert _weaker(looser, limited) == []
    reserved = copy.deepcopy(base)
    reserved["budgets"] = {"reserve_max_tokens": 8192}
    reserved["rate_limits"]["unbounded_output_tokens"] = 4096
    assert _weaker(reserved, base) == ["budgets.reserve_max_tokens lowered from 8192 to 4096"]
    lowered = copy.deepcopy(reserved)
    lowered["rate_limits"]["unbounded_output_tokens"] = 100
    assert _weaker(reserved, lowered) == ["rate_limits.unbounded_output_tokens lowered from 4096 to 100"]
    assert _weaker(lowered, reserved) == []


def _fast_lane(priority: Any) -> dict[str, Any]:
    return {"name": "fast-lane", "priority": priority, "when": {"models": ["m"]}, "then": {"route": "m"}}


def test_a_rule_put_ahead_by_a_priority_written_as_text_or_a_float() -> None:
    """red8 B1: the config reads `priority: "10"` and `10.0` as 10 (the core tries that rule
    first); the guard read them as 0, so a rule put ahead of a restriction went unseen."""
    ruled = {"rules": [TEAM_RULE]}
    for priority in (10, "10", 10.0, " 10 "):
        ahead = {"rules": [TEAM_RULE, _fast_lane(priority)]}
        assert _weaker(ruled, ahead) == ["a rule put ahead of restriction rule 'legal-stays-in-eu'"], priority
    # One the config cannot read sorts first: moving it needs an admin, never the other way round.
    odd = {"rules": [TEAM_RULE, _fast_lane("soon")]}
    assert _weaker(ruled, odd) == ["a rule put ahead of restriction rule 'legal-stays-in-eu'"]
    assert _weaker(ruled, {"rules": [TEAM_RULE, _fast_lane("-3")]}) == []  # after it: tried later


async def test_an_operator_cannot_roll_back_to_a_rule_ahead_by_a_quoted_priority(
    start_upstream: Any, tmp_path: Path
) -> None:
    path = tmp_path / "edgeroute.yaml"
    v1 = _open(await start_upstream())
    v1["rules"] = [TEAM_RULE]
    async with served_file(path, v1) as url:  # version 1: legal stays on d-b
        assert {await _deployment(url, LEGAL) for _ in range(6)} == {"d-b"}
        v2 = copy.deepcopy(v1)
        v2["rules"] = [TEAM_RULE, {**_fast_lane("10"), "then": {"deployments": ["d-a"]}}]
        write_config(path, v2)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 2, an admin's
        assert {await _deployment(url, LEGAL) for _ in range(6)} == {"d-a"}  # the core tries it first
        write_config(path, v1)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 3
        status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": 2})
        assert status == 403, body
        assert "a rule put ahead of restriction rule 'legal-stays-in-eu'" in body["error"]["message"], body
        assert {await _deployment(url, LEGAL) for _ in range(6)} == {"d-b"}
