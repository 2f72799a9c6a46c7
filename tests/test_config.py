"""Config validation: every error names the file, the path inside it and what is wrong."""

from __future__ import annotations

import copy
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeroute import config as config_mod

BASE: dict[str, Any] = {
    "providers": {"p": {"base_url": "http://127.0.0.1:1/v1", "api_key": "env:EDGEROUTE_TEST_KEY"}},
    "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
    "models": {"m": {"deployments": ["d"]}},
}


def errors_for(data: Any) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(data, "cfg.yaml")
    return e.value.errors


def with_(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEROUTE_TEST_KEY", "sk-test-secret")


def test_valid_config_loads() -> None:
    cfg = config_mod.parse(BASE, "cfg.yaml")
    assert cfg.deployments["d"].price.output_per_mtok == 2
    assert cfg.server.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (with_("deployments.d.colour", "blue"), "cfg.yaml: deployments.d.colour: unknown key"),
        (with_("deployments.d.provider", "nope"), "cfg.yaml: deployments.d.provider: unknown provider 'nope'"),
        (with_("models.m.deployments", ["d", "x"]), "cfg.yaml: models.m.deployments[1]: unknown deployment 'x'"),
        (with_("models.m.fallbacks", ["m"]), "cfg.yaml: models.m.fallbacks[0]: a model cannot fall back to itself"),
        (
            with_("deployments.d.price.input_per_mtok", -1),
            "cfg.yaml: deployments.d.price.input_per_mtok: Input should be greater than or equal to 0",
        ),
        (
            with_("providers.p.base_url", "ftp://x"),
            "cfg.yaml: providers.p.base_url: must start with http:// or https://",
        ),
        (
            with_("providers.p.api_key", "env:EDGEROUTE_MISSING"),
            "cfg.yaml: providers.p.api_key: environment variable EDGEROUTE_MISSING is not set",
        ),
        (with_("models.m.strategy", "random"), "cfg.yaml: models.m.strategy: Input should be"),
        (
            {**BASE, "rules": [{"name": "r", "then": {"route": "zzz"}}]},
            "cfg.yaml: rules[0].then.route: unknown model 'zzz'",
        ),
        (
            {**BASE, "rules": [{"name": "r", "when": {"patterns": ["x", "("]}, "then": {}}]},
            "cfg.yaml: rules[0].when.patterns[1]: not a valid pattern: unclosed group",
        ),
        (
            {**BASE, "rules": [{"name": "r", "when": {"time": {"start": "25:00", "end": "1:00"}}, "then": {}}]},
            "cfg.yaml: rules[0].when.time.start: '25:00' is not a time of day",
        ),
        ([1, 2], "cfg.yaml: (top level): expected a mapping"),
    ],
)
def test_errors_name_file_path_and_problem(data: Any, expected: str) -> None:
    errs = errors_for(data)
    assert any(expected in e for e in errs), errs


def test_all_errors_reported_at_once() -> None:
    data = with_("deployments.d.colour", "blue")
    data["models"]["m"]["size"] = 3
    assert len(errors_for(data)) == 2


def test_secret_never_in_errors_or_repr(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-file-secret\n")
    data = with_("providers.p.api_key", f"file:{key_file}")
    cfg = config_mod.parse(data, "cfg.yaml")
    from edgeroute import secrets

    s = secrets.resolve(cfg.providers["p"].api_key or "")
    assert s.reveal() == "sk-file-secret"
    assert "sk-file-secret" not in repr(s) and "sk-file-secret" not in str(s)


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    r = subprocess.run([sys.executable, "-m", "edgeroute", "check", str(good)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "OK (1 provider, 1 deployment, 1 model, 0 rules)" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("deployments.d.colour", "blue")))
    r = subprocess.run([sys.executable, "-m", "edgeroute", "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert f"{bad}:3:5: deployments.d.colour: unknown key" in r.stderr  # line and column of the key
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [\n")
    r = subprocess.run([sys.executable, "-m", "edgeroute", "check", str(broken)], capture_output=True, text=True)
    assert r.returncode == 1 and f"{broken}:2:1: invalid YAML" in r.stderr


def test_demo_config_is_valid() -> None:
    from edgeroute.demo import demo_config_data

    cfg = config_mod.parse(demo_config_data(), "demo.yaml")
    assert set(cfg.models) == {"gpt-4o", "gpt-4o-mini", "cheap"}


def test_experiment_may_compare_a_policy_route_with_a_fixed_one() -> None:
    data = copy.deepcopy(BASE)
    data["models"]["auto"] = {
        "policy": {"threshold": 0.5, "candidates": [{"route": "m", "model": "gpt-4-1106-preview"}]}
    }
    data["models"]["ab"] = {
        "experiment": {"variants": [{"route": "auto", "percent": 50}, {"route": "m", "percent": 50}]}
    }
    cfg = config_mod.parse(data, "cfg.yaml")
    assert cfg.models["ab"].experiment is not None
    data["models"]["ab"]["experiment"]["variants"][0]["percent"] = 60
    assert any("percents add up to 110, not 100" in e for e in errors_for(data))
    data["models"]["auto"]["policy"]["candidates"][0]["model"] = "no-such-llm"
    data["models"]["ab"]["experiment"]["variants"][0]["percent"] = 50
    assert any("the router model has no output `no-such-llm`" in e for e in errors_for(data))


def test_unresolvable_shared_api_keys_are_config_errors(monkeypatch) -> None:
    monkeypatch.delenv("EDGEROUTE_TEST_MISSING_KEY", raising=False)
    cfg = {
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        "server": {"api_keys": ["env:EDGEROUTE_TEST_MISSING_KEY"]},
    }
    try:
        config_mod.parse(cfg, "t.yaml")
    except config_mod.ConfigError as e:
        assert "server.api_keys[0]" in str(e) and "EDGEROUTE_TEST_MISSING_KEY" in str(e)
    else:
        raise AssertionError("an unresolvable server.api_keys reference was accepted")


def test_two_keys_with_one_token_are_a_config_error(monkeypatch) -> None:
    monkeypatch.setenv("EDGEROUTE_TEST_TOKEN", "tok-shared")
    cfg = {
        "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        "keys": {
            "alice": {"token": "env:EDGEROUTE_TEST_TOKEN", "team": "a"},
            "admin": {"token_sha256": hashlib.sha256(b"tok-shared").hexdigest(), "role": "admin"},
        },
    }
    try:
        config_mod.parse(cfg, "t.yaml")
    except config_mod.ConfigError as e:
        assert "keys.admin: has the same token as keys.alice" in str(e)
    else:
        raise AssertionError("two keys with one token were accepted")
