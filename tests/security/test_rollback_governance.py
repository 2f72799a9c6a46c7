"""A rollback below admin cannot weaken data governance.

`POST /admin/config/rollback` is an operator's route, and it applied a stored version whole:
a version from before an admin set `governance.residency`, added a PII rule or lowered what
the request log keeps undid those too, in an operator's hands (or the rollback guard's, when
errors rose, which a client may cause). Now a rollback that removes or loosens residency,
removes, changes or overtakes a PII rule (`when.pii` or `when.patterns`), gives a deployment
a tag those rely on, sends a deployment they route to elsewhere (its provider's base_url,
proxy or region), or keeps more content (`log_content` none < redacted < full, for any key
or model) or keeps it longer or larger (`retention_days`, `max_db_mb`, `max_content_bytes`) needs an admin key: 403
`permission_denied` naming what, nothing changed, audited as refused.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import yaml

from edgeroute.governance.weakening import weakenings
from tests.conftest import eventually, simple_config
from tests.governance_support import Instance, call, write_config
from tests.security.governed import USER

ROOT, OP = "tok-root-0123456789", "tok-oper-0123456789"
PII_RULE = {"name": "pii-stays-in-eu", "priority": 100, "when": {"pii": ["email"]}, "then": {"require_tags": ["eu"]}}
EMAIL: Any = [{"role": "user", "content": "write to ann@example.com"}]


def _loose(up: Any) -> dict[str, Any]:
    """Version 1: no residency, no PII rule, the request log keeps every prompt in full."""
    cfg = simple_config({"a": up, "b": up})
    cfg["deployments"]["d-b"]["tags"] = ["eu"]
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "op": {"token": OP, "role": "operator"}}
    cfg["request_log"] = {"log_content": "full"}
    return cfg


def _governed(cfg: dict[str, Any]) -> dict[str, Any]:
    """What an admin set since: residency, a PII rule and the tags they rely on."""
    cfg = copy.deepcopy(cfg)
    cfg["rules"] = [PII_RULE]
    cfg["governance"] = {"residency": {"tag_prefix": "region:", "keys": {"op": "eu"}}}
    cfg["deployments"]["d-b"]["tags"] = ["eu", "region:eu"]
    return cfg


async def _deployment(url: str, messages: Any) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ROOT, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=messages)
        return raw.headers["x-edgeroute-deployment"]
    finally:
        await client.close()


@contextlib.contextmanager
def _serving(path: Path, cfg: dict[str, Any]) -> Iterator[str]:
    write_config(path, cfg)
    inst = Instance(path, path.parent / "serve.log")
    try:
        inst.wait_ready()
        yield inst.url
    finally:
        inst.stop()


async def test_an_operator_cannot_roll_back_residency_pii_rules_or_log_content(
    start_upstream: Any, tmp_path: Path
) -> None:
    path = tmp_path / "edgeroute.yaml"
    loose = _loose(await start_upstream())
    with _serving(path, loose):  # version 1
        pass
    loose["request_log"] = {"log_content": "redacted", "content_models": {"m": "none"}}
    with _serving(path, loose) as url:  # version 2 (the request log takes a restart)
        governed = _governed(loose)
        write_config(path, governed)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 3
        governed["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, governed)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 4
        assert {await _deployment(url, EMAIL) for _ in range(6)} == {"d-b"}

        weaker = ["governance.residency removed", "PII rule 'pii-stays-in-eu' removed or changed",
                  "request_log keeps full content, was redacted"]  # fmt: skip
        for version, named in [(1, weaker), (2, weaker[:2])]:
            status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": version})
            assert status == 403, body
            err = body["error"]
            assert err["code"] == "permission_denied" and "role 'admin'" in err["message"], err
            assert "data governance" in err["message"]
            assert [w for w in weaker if w in err["message"]] == named, err["message"]
        status, body = await call("GET", url + "/admin/config", ROOT)
        assert body["version"] == 4 and body["config"]["rules"][0]["name"] == "pii-stays-in-eu"
        assert "pii-stays-in-eu" in path.read_text()
        assert {await _deployment(url, EMAIL) for _ in range(6)} == {"d-b"}
        status, body = await call("GET", url + "/admin/audit?action=config.rollback_refused", ROOT)
        refused = body["entries"][0]
        assert refused["actor"] == "op" and refused["after"]["needs"] == "admin"
        assert refused["after"]["version"] == 2 and "governance.residency removed" in refused["after"]["weakens"]

        # A rollback that leaves data governance alone is still an operator's: version 3 drops m2.
        status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": 3})
        assert status == 200, body
        assert "m2" not in path.read_text()
        # An admin may: its choice.
        status, body = await call("POST", url + "/admin/config/rollback", ROOT, json={"version": 2})
        assert status == 200, body
        assert "pii-stays-in-eu" not in path.read_text()


async def test_the_rollback_guard_does_not_undo_a_pii_rule(start_upstream: Any, tmp_path: Path) -> None:
    """Errors a client may cause (an upstream made to fail) within the guard's window rolled a
    reload back whole: the PII rule it added went with it."""
    up = await start_upstream()
    path = tmp_path / "edgeroute.yaml"
    loose = _loose(up)
    loose["governance"] = {"rollback_guard": {"window_s": 30, "max_error_rate": 0.5, "min_requests": 3}}
    with _serving(path, loose) as url:
        ruled = copy.deepcopy(loose)
        ruled["rules"] = [PII_RULE]
        write_config(path, ruled)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200
        up.options.fail_status = 500

        async def refused() -> bool:
            for key in (ROOT, OP):  # failing for more than one sender: the guard judges the config
                await call("POST", url + "/v1/chat/completions", key, json={"model": "m", "messages": USER})
            status, body = await call("GET", url + "/admin/audit?action=config.auto_rollback_refused", ROOT)
            return status == 200 and bool(body["entries"])

        await eventually(refused, "the guard trying to roll back", within=20, every=0.2)
        _, body = await call("GET", url + "/admin/config", ROOT)
        assert body["version"] == 2 and body["config"]["rules"][0]["name"] == "pii-stays-in-eu"


async def test_an_operator_cannot_point_a_resident_deployment_elsewhere(start_upstream: Any, tmp_path: Path) -> None:
    """Version 1 had the EU deployment's provider at another host; an admin moved it since. An
    operator's rollback to version 1 kept residency and the PII rule as they were, and sent
    every EU-bound prompt to the other host."""
    eu, elsewhere, other = [await start_upstream(record=True) for _ in range(3)]
    path = tmp_path / "edgeroute.yaml"
    cfg = _governed(_loose(eu))
    cfg["providers"]["b"]["base_url"] = elsewhere.base_url
    with _serving(path, cfg) as url:  # version 1
        cfg["providers"]["b"]["base_url"] = eu.base_url
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 2
        cfg["providers"]["a"]["base_url"] = other.base_url  # d-a: neither tagged nor named by a rule
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 3

        status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": 1})
        assert status == 403, body
        msg = body["error"]["message"]
        assert body["error"]["code"] == "permission_denied" and "role 'admin'" in msg
        assert "deployments.d-b (tagged eu, region:eu) changes its base_url" in msg, msg
        assert elsewhere.base_url not in msg and "d-a" not in msg
        _, body = await call("GET", url + "/admin/audit?action=config.rollback_refused", ROOT)
        refused = body["entries"][0]
        assert refused["actor"] == "op" and refused["after"]["version"] == 1
        assert refused["after"]["weakens"] == ["deployments.d-b (tagged eu, region:eu) changes its base_url"]
        assert {await _deployment(url, EMAIL) for _ in range(4)} == {"d-b"}
        assert elsewhere.options.requests == [] and eu.options.requests
        # Moving a deployment no residency or PII rule relies on is an operator's.
        status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": 2})
        assert status == 200, body


SSN_RULE = {
    "name": "employee-ids-stay-in-eu",
    "priority": 90,
    "when": {"patterns": [r"\bEMP-\d{6}\b"]},
    "then": {"require_tags": ["eu"]},
}
EMPLOYEE: Any = [{"role": "user", "content": "summarise the file of EMP-123456"}]


async def test_an_operator_cannot_roll_back_a_pattern_rule_or_the_logs_bounds(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A rule that keeps data a regular expression finds (`when.patterns`) is a PII rule as
    much as one on `when.pii`: an operator's rollback to before it removed it, and the
    requests it kept on the EU deployment went anywhere. A version whose request log kept
    records longer, or more of each prompt, is the admin's to restore too."""
    path = tmp_path / "edgeroute.yaml"
    cfg = _loose(await start_upstream())
    cfg["request_log"] = {"log_content": "redacted", "retention_days": 365, "max_content_bytes": 1 << 20}
    with _serving(path, cfg):  # version 1
        pass
    cfg["request_log"] = {"log_content": "redacted", "retention_days": 7, "max_content_bytes": 4096}
    with _serving(path, cfg) as url:  # version 2 (the request log takes a restart)
        ruled = copy.deepcopy(cfg)
        ruled["rules"] = [SSN_RULE]
        write_config(path, ruled)
        assert (await call("POST", url + "/admin/reload", ROOT))[0] == 200  # version 3
        assert {await _deployment(url, EMPLOYEE) for _ in range(6)} == {"d-b"}

        rule = "PII rule 'employee-ids-stay-in-eu' removed or changed"
        bounds = ["request_log.retention_days raised from 7 to 365", "request_log.max_content_bytes raised from 4096"]
        for version, named in [(2, [rule]), (1, [rule, *bounds])]:
            status, body = await call("POST", url + "/admin/config/rollback", OP, json={"version": version})
            assert status == 403, body
            msg = body["error"]["message"]
            assert body["error"]["code"] == "permission_denied" and "data governance" in msg, msg
            assert [w for w in [rule, *bounds] if w in msg] == named, msg
        _, body = await call("GET", url + "/admin/config", ROOT)
        assert body["version"] == 3 and body["config"]["rules"][0]["name"] == "employee-ids-stay-in-eu"
        assert {await _deployment(url, EMPLOYEE) for _ in range(6)} == {"d-b"}


def test_pattern_rules_and_the_logs_bounds_count_as_weaker() -> None:
    loose = _loose(SimpleNamespace(base_url="http://127.0.0.1:9"))
    ruled = copy.deepcopy(loose)
    ruled["rules"] = [SSN_RULE]
    assert _weaker(ruled, loose) == ["PII rule 'employee-ids-stay-in-eu' removed or changed"]
    widened = copy.deepcopy(ruled)
    widened["rules"][0]["when"]["patterns"] = [r"\bEMP-\d{9}\b"]
    assert _weaker(ruled, widened) == ["PII rule 'employee-ids-stay-in-eu' removed or changed"]
    ahead = copy.deepcopy(ruled)
    ahead["rules"].insert(0, {"name": "all-cheap", "priority": 200, "then": {"route": "m"}})
    assert _weaker(ruled, ahead) == ["a rule put ahead of PII rule 'employee-ids-stay-in-eu'"]
    # Its tags and destinations are guarded as a `when.pii` rule's are.
    tagged = copy.deepcopy(ruled)
    tagged["deployments"]["d-a"]["tags"] = ["eu"]
    assert _weaker(ruled, tagged) == ["deployments.d-a gains tag eu"]

    shared = copy.deepcopy(loose)
    shared["server"] = {"provider_files": "shared"}
    assert _weaker(loose, shared) == ["server.provider_files shared with every tenant"]
    assert _weaker(shared, loose) == []

    log = copy.deepcopy(loose)
    log["request_log"] = {"log_content": "redacted", "retention_days": 7, "max_content_bytes": 4096, "max_db_mb": 100}
    longer = copy.deepcopy(log)
    longer["request_log"] |= {"retention_days": 90, "max_content_bytes": 65536, "max_db_mb": None}
    assert _weaker(log, longer) == [
        "request_log.retention_days raised from 7 to 90",
        "request_log.max_db_mb removed",
        "request_log.max_content_bytes raised from 4096 to 65536",
    ]
    assert _weaker(longer, log) == []  # shorter and smaller is an operator's
    defaults = copy.deepcopy(log)
    del defaults["request_log"]["retention_days"]  # 30 days by default
    assert _weaker(log, defaults) == ["request_log.retention_days raised from 7 to 30.0"]
    # No content kept: a larger max_content_bytes keeps nothing more; a log turned off keeps nothing.
    private = copy.deepcopy(longer)
    private["request_log"]["log_content"] = "none"
    assert _weaker(log | {"request_log": log["request_log"] | {"log_content": "none"}}, private) == [
        "request_log.retention_days raised from 7 to 90",
        "request_log.max_db_mb removed",
    ]
    off = copy.deepcopy(longer)
    off["request_log"]["enabled"] = False
    assert _weaker(log, off) == []
    # From redacted (or none) to full is more content kept, as before.
    full = copy.deepcopy(log)
    full["request_log"]["log_content"] = "full"
    assert _weaker(log, full) == ["request_log keeps full content, was redacted (default)"]


def _weaker(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return weakenings(yaml.safe_dump(before), yaml.safe_dump(after))


def test_what_counts_as_weaker() -> None:
    loose = _loose(SimpleNamespace(base_url="http://127.0.0.1:9"))
    base = _governed(loose)
    base["request_log"] = {"log_content": "redacted", "content_models": {"m": "none"}}
    assert _weaker(base, base) == []
    assert _weaker(loose, base) == []  # stronger is an operator's
    moved = copy.deepcopy(base)
    moved["governance"]["residency"]["keys"]["op"] = "us"
    assert _weaker(base, moved) == ["governance.residency.keys.op changed from eu to us"]
    ahead = copy.deepcopy(base)
    ahead["rules"].insert(0, {"name": "all-cheap", "priority": 200, "then": {"route": "m"}})
    assert _weaker(base, ahead) == ["a rule put ahead of PII rule 'pii-stays-in-eu'"]
    behind = copy.deepcopy(base)
    behind["rules"].append({"name": "cheap", "then": {"route": "m"}})
    assert _weaker(base, behind) == []
    tagged = copy.deepcopy(base)
    tagged["deployments"]["d-a"]["tags"] = ["eu"]
    assert _weaker(base, tagged) == ["deployments.d-a gains tag eu"]
    per_key = copy.deepcopy(base)
    per_key["request_log"]["content_keys"] = {"op": "full"}
    assert "request_log keeps full content, was none (key op model m)" in _weaker(base, per_key)
    model_up = copy.deepcopy(base)
    model_up["request_log"]["content_models"] = {"m": "redacted"}
    assert _weaker(base, model_up) == ["request_log keeps redacted content, was none (model m)"]
    assert _weaker(model_up, base) == []
    # Where a governed deployment's requests go: resolved through `provider:`, never its value.
    proxied = copy.deepcopy(base)
    proxied["providers"]["b"]["proxy"] = "http://user:secret@proxy.example:3128"
    assert _weaker(base, proxied) == ["deployments.d-b (tagged eu, region:eu) changes its proxy"]
    renamed = copy.deepcopy(base)
    renamed["providers"]["b2"] = renamed["providers"].pop("b")
    renamed["deployments"]["d-b"]["provider"] = "b2"
    assert _weaker(base, renamed) == []
    bedrock = copy.deepcopy(base)
    bedrock["providers"]["b"] |= {"kind": "bedrock", "options": {"region": "eu-west-1"}}
    bedrock["deployments"]["d-b"]["model"] = "eu.anthropic.claude-sonnet-4"
    crossed = copy.deepcopy(bedrock)
    crossed["providers"]["b"]["options"] = {"region": "us-east-1", "api_version": "x"}
    crossed["deployments"]["d-b"]["model"] = "global.anthropic.claude-sonnet-4"
    assert _weaker(bedrock, crossed) == [
        "deployments.d-b (tagged eu, region:eu) changes its region",
        "deployments.d-b (tagged eu, region:eu) changes its model",
    ]
    # A PII rule that excludes a tag lets every deployment without it take its requests.
    excluding = copy.deepcopy(loose)
    excluding["rules"] = [{"name": "no-pii-out", "when": {"pii": ["email"]}, "then": {"exclude_tags": ["external"]}}]
    excluding["deployments"]["d-b"]["tags"] = ["external"]
    out = copy.deepcopy(excluding)
    out["providers"]["a"]["base_url"] = "https://api.elsewhere.example"
    out["providers"]["b"]["base_url"] = "https://api.elsewhere.example"
    assert _weaker(excluding, out) == ["deployments.d-a (open to a PII rule's requests) changes its base_url"]
    # A PII rule that routes to a model: a deployment added to it (or to its fallback) takes PII.
    routed = copy.deepcopy(loose)
    routed["models"]["local"] = {"deployments": ["d-b"], "fallbacks": ["spare"]}
    routed["models"]["spare"] = {"deployments": ["d-b"]}
    routed["rules"] = [{"name": "pii-local", "when": {"pii": ["email"]}, "then": {"route": "local"}}]
    widened = copy.deepcopy(routed)
    widened["models"]["spare"]["deployments"].append("d-a")
    assert _weaker(routed, widened) == ["deployments.d-a joins the route of a PII rule"]
    moved_local = copy.deepcopy(routed)
    moved_local["providers"]["b"]["base_url"] = "https://api.elsewhere.example"
    assert _weaker(routed, moved_local) == ["deployments.d-b (named by a PII rule) changes its base_url"]
    # Every other way a route hands on its requests (or copies of them) reaches d-a as well.
    routed["models"]["m"] = {"deployments": ["d-a"]}
    handed_on = {
        "shadow": {"shadow": {"model": "m", "percent": 10}},
        "fallbacks_on": {"fallbacks_on": {"timeout": ["m"]}},
        "experiment": {"experiment": {"variants": [{"route": "local", "percent": 50}, {"route": "m", "percent": 50}]}},
        "policy": {"policy": {"candidates": [{"route": "m", "model": "x"}], "threshold": 0.5}},
        "a fallback's fallback": {},
    }
    for how, extra in handed_on.items():
        via = copy.deepcopy(routed)
        via["models"]["spare"].update(extra or {"fallbacks": ["m"]})
        assert _weaker(routed, via) == ["deployments.d-a joins the route of a PII rule"], how
    looped = copy.deepcopy(routed)
    looped["models"]["spare"]["fallbacks"] = ["local"]  # a cycle ends
    assert _weaker(routed, looped) == []
    # A stored version is read as written, before it is validated again: odd shapes are no 500.
    odd = {"rules": {"x": 1}, "deployments": {"d-a": {"tags": 5}}, "request_log": {"content_models": {1: "full"}}}
    assert _weaker(base, odd) == [
        "governance.residency removed",
        "PII rule 'pii-stays-in-eu' removed or changed",
        "request_log keeps full content, was redacted (model 1)",
    ]
    odd_where = copy.deepcopy(base)
    odd_where["deployments"]["d-b"]["provider"] = ["b"]
    odd_where["rules"][0]["then"]["route"] = ["m"]
    assert _weaker(base, odd_where) == [
        "PII rule 'pii-stays-in-eu' removed or changed",
        "deployments.d-b (tagged eu, region:eu) changes its base_url",
    ]
