"""An operator's rollback cannot undo an admin's data or access controls that were not guarded.

An operator rolled back to a version where a model's response cache was `scope: global` (team b
was served team a's cached answer), lifted an admin's `keywords` reject rule, a `teams:` reject
rule (a team's suspension) and a team budget, and raised `governance.keys_stale_after_s` (a cut-off
instance serves revoked keys that long). Each now weakens data governance: the operator gets 403
naming it, the running config is unchanged; an admin may still roll back.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute.governance.weakening import weakenings
from tests.conftest import eventually, simple_config
from tests.governance_support import call, served_file, write_config

ADMIN, OPERATOR = "tok-admin-0123456789", "tok-operator-0123456789"
TEAM_A, TEAM_B = "tok-team-a-0123456789", "tok-team-b-0123456789"
ASK: Any = {"model": "m", "messages": [{"role": "user", "content": "patient 4411"}], "temperature": 0}

# What the admin adds in version 2 (version 1 lacks it), and how the operator's 403 names it.
CHANGES: list[tuple[str, Any, str]] = [
    ("cache", {"models": {"m": {"cache": {"ttl": 300, "scope": "key"}}}}, "models.m.cache shared more widely"),
    ("keywords", {"rules": [{"name": "no-project-x", "when": {"keywords": ["project-x"]},
                             "then": {"reject": "not here"}}]}, "PII rule 'no-project-x' removed"),
    ("suspension", {"rules": [{"name": "suspend-b", "when": {"teams": ["b"]}, "then": {"reject": "suspended"}}]},
     "reject rule 'suspend-b' removed"),
    ("budget", {"budgets": {"limits": [{"name": "b-day", "scope": "team", "match": "b", "period": "day",
                                        "limit_usd": 1}]}}, "budget b-day removed"),
    ("stale", {"governance": {"keys_stale_after_s": 5}}, "governance.keys_stale_after_s raised from 5 to 30"),
    ("key-caps", {"governance": {"max_keys_per_team": 10}}, "governance.max_keys_per_team raised from 10 to 1000"),
]  # fmt: skip


def test_a_shorter_audit_retention_weakens_governance() -> None:
    """A rollback to a version keeping the audit for fewer days deleted entries at the next write,
    the rollback's own among them."""
    keep = "governance: {audit_retention_days: %s}\n"
    assert weakenings(keep % 365, keep % 7) == ["governance.audit_retention_days shortened from 365 to 7"]
    assert weakenings("{}", keep % 30) == ["governance.audit_retention_days shortened from for ever to 30"]
    assert weakenings(keep % 7, keep % 365) == weakenings(keep % 7, "{}") == []


def test_traces_and_alerts_sent_elsewhere_weaken_governance() -> None:
    hooks = "alerts: {webhooks: {pager: {url: '%s'}}}"
    assert weakenings(hooks % "https://pager.example/x", hooks % "https://evil.example/tok") == [
        "alerts.webhooks.pager sends notifications to another address"
    ]
    assert weakenings("{}", hooks % "https://evil.example/tok") == [
        "alerts.webhooks.pager sends notifications to another address"
    ]
    assert weakenings(hooks % "https://pager.example/x", "{}") == []  # fewer receivers: nothing leaves
    tracing = "tracing: {enabled: %s, endpoint: '%s'}"
    assert weakenings(tracing % ("false", "http://evil:4318"), tracing % ("true", "http://evil:4318")) == [
        "tracing.endpoint sends traces to another address"
    ]
    assert weakenings(tracing % ("true", "http://a:4318"), tracing % ("true", "http://a:4318")) == []
    assert weakenings(tracing % ("true", "http://a:4318"), tracing % ("false", "http://b:4318")) == []


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
async def served(start_upstream: Any, tmp_path: Path) -> AsyncIterator[tuple[str, Path, dict[str, Any]]]:
    cfg = simple_config({"a": await start_upstream()})
    cfg["models"]["m"]["cache"] = {"ttl": 300, "scope": "global"}
    cfg["keys"] = {
        "root": {"token": ADMIN, "role": "admin"},
        "ops": {"token": OPERATOR, "role": "operator"},
        "a": {"token": TEAM_A, "team": "a"},
        "b": {"token": TEAM_B, "team": "b"},
    }
    path = tmp_path / "edgeroute.yaml"
    async with served_file(path, cfg) as url:
        yield url, path, cfg


@pytest.mark.parametrize(("what", "extra", "named"), CHANGES, ids=[c[0] for c in CHANGES])
async def test_an_operator_cannot_roll_back_an_admins_control(
    served: tuple[str, Path, dict[str, Any]], what: str, extra: dict[str, Any], named: str
) -> None:
    url, path, cfg = served
    write_config(path, _merged(cfg, extra))
    assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
    status, err = await call("POST", url + "/admin/config/rollback", OPERATOR, json={"version": 1})
    assert status == 403 and err["error"]["code"] == "permission_denied", err
    assert named in err["error"]["message"] and "weakens data governance" in err["error"]["message"], err
    assert (await call("GET", url + "/admin/config", OPERATOR))[1]["version"] == 2  # unchanged
    status, body = await call("POST", url + "/admin/config/rollback", ADMIN, json={"version": 1})
    assert status == 200 and body["rolled_back_to"] == 1, body


async def test_tenants_keep_their_own_cache_after_a_refused_rollback(served: tuple[str, Path, dict[str, Any]]) -> None:
    url, path, cfg = served
    write_config(path, _merged(cfg, CHANGES[0][1]))
    assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
    assert (await call("POST", url + "/admin/config/rollback", OPERATOR, json={"version": 1}))[0] == 403
    a = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TEAM_A, max_retries=0)
    b = openai.AsyncOpenAI(base_url=url + "/v1", api_key=TEAM_B, max_retries=0)
    try:
        first = await a.chat.completions.with_raw_response.create(**ASK)
        assert first.headers["x-edgeroute-cache"] == "miss"
        other = await b.chat.completions.with_raw_response.create(**ASK)
        assert other.headers["x-edgeroute-cache"] == "miss"  # team a's answer is not team b's
    finally:
        await a.close()
        await b.close()


async def test_the_rollback_guard_does_not_widen_a_cache(start_upstream: Any, tmp_path: Path) -> None:
    """Errors a client may cause within the guard's window rolled a reload back whole: a cache
    narrowed to `scope: key` went back to `global`."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 300, "scope": "global"}
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}, "a": {"token": TEAM_A, "team": "a"},
                   "b": {"token": TEAM_B, "team": "b"}}  # fmt: skip
    cfg["governance"] = {"rollback_guard": {"window_s": 30, "max_error_rate": 0.5, "min_requests": 3}}
    path = tmp_path / "edgeroute.yaml"
    async with served_file(path, cfg) as url:
        write_config(path, _merged(cfg, CHANGES[0][1]))
        assert (await call("POST", url + "/admin/reload", ADMIN))[0] == 200
        up.options.fail_status = 500

        async def refused() -> list[Any]:
            for key in (TEAM_A, TEAM_B):  # failing for more than one sender: the guard judges the config
                await call("POST", url + "/v1/chat/completions", key, json=ASK)
            status, body = await call("GET", url + "/admin/audit?action=config.auto_rollback_refused", ADMIN)
            return body["entries"] if status == 200 else []

        entries = await eventually(refused, "the guard trying to roll back", within=20, every=0.2)
        assert "models.m.cache shared more widely (global)" in entries[0]["after"]["weakens"], entries
        _, body = await call("GET", url + "/admin/config", ADMIN)
        assert body["version"] == 2 and body["config"]["models"]["m"]["cache"]["scope"] == "key"
