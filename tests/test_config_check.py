"""`edgeroute check` as a user runs it on a YAML file: every problem at its line and column,
with the path in the config, and a suggestion where a name looks like a typo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeroute import config as config_mod

HEAD = """\
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
deployments:
  d-eu: {provider: p, model: gpt-4o-mini, tags: [eu, cheap]}
models:
  gpt-4.1:
    deployments: [d-eu]
"""


def check(tmp_path: Path, text: str) -> tuple[int, str]:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "edgeroute", "check", str(path)], capture_output=True, text=True)
    return r.returncode, r.stderr.replace(str(path), "edge.yaml")


def test_a_duplicate_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    code, err = check(tmp_path, HEAD + "  gpt-4.1:\n    deployments: [d-eu]\n")
    assert code == 1
    assert "edge.yaml:8:3: invalid YAML: duplicate key 'gpt-4.1' (first given on line 6" in err


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = HEAD.replace("  gpt-4.1:\n", "  base: &base {deployments: [d-eu], strategy: weighted}\n  gpt-4.1:\n")
    text += "    <<: *base\n    strategy: lowest_cost\n"
    text = text.replace("    deployments: [d-eu]\n    <<: *base", "    <<: *base")
    code, err = check(tmp_path, text)
    assert code == 0, err
    cfg = config_mod.load(tmp_path / "edge.yaml")
    assert cfg.models["gpt-4.1"].strategy == "lowest_cost"


def test_schema_errors_name_line_column_and_suggest_the_key(tmp_path: Path) -> None:
    text = HEAD + "    stratgy: lowest_cost\n    max_attempts: 0\n"
    code, err = check(tmp_path, text)
    assert code == 1
    lines = err.splitlines()
    assert "edge.yaml:8:5: models.gpt-4.1.stratgy: unknown key (did you mean 'strategy'?)" in lines
    assert any(line.startswith("edge.yaml:9:5: models.gpt-4.1.max_attempts: Input should be greater") for line in lines)


def test_unknown_names_suggest_the_closest_one(tmp_path: Path) -> None:
    code, err = check(tmp_path, HEAD + "    fallbacks: [gpt-41]\n  mini:\n    deployments: [d-ue]\n")
    assert code == 1
    lines = err.splitlines()
    assert "edge.yaml:8:17: models.gpt-4.1.fallbacks[0]: unknown model 'gpt-41' (did you mean 'gpt-4.1'?)" in lines
    assert "edge.yaml:10:19: models.mini.deployments[0]: unknown deployment 'd-ue' (did you mean 'd-eu'?)" in lines


def test_a_rule_requiring_a_tag_no_deployment_has_could_never_match(tmp_path: Path) -> None:
    rules = """\
rules:
  - name: eu-only
    when: {teams: [legal]}
    then: {require_tags: [eu, euu], exclude_tags: [gpu]}
"""
    code, err = check(tmp_path, HEAD + rules)
    assert code == 1
    lines = err.splitlines()
    assert (
        "edge.yaml:11:31: rules[0].then.require_tags[1]: unknown tag 'euu' (did you mean 'eu'?): "
        "no deployment has it, so the rule could never be satisfied"
    ) in lines
    assert (
        "edge.yaml:11:52: rules[0].then.exclude_tags[0]: unknown tag 'gpu': no deployment has it, "
        "so it excludes nothing" in lines
    )
    assert not any("require_tags[0]" in line for line in lines)


def test_rule_times_and_patterns_are_reported_at_their_yaml_path(tmp_path: Path) -> None:
    rules = """\
rules:
  - name: office-hours
    when:
      time: {start: "09:00", end: "24:30"}
      patterns:
        - 'ticket-\\d+'
        - '(?<=secret)'
    then: {route: gpt-4.1}
"""
    code, err = check(tmp_path, HEAD + rules)
    assert code == 1
    assert err.splitlines() == ["edge.yaml:11:30: rules[0].when.time.end: '24:30' is not a time of day"]
    code, err = check(tmp_path, HEAD + rules.replace("24:30", "18:00"))
    assert code == 1
    assert err.splitlines() == [
        "edge.yaml:14:11: rules[0].when.patterns[1]: not a valid pattern: "
        "look-around, including look-ahead and look-behind, is not supported"
    ]
    assert "router config" not in err  # not the core's internal JSON
    code, err = check(tmp_path, HEAD + rules.replace("24:30", "18:00").replace("'(?<=secret)'", "'secret'"))
    assert code == 0, err


@pytest.mark.parametrize("text", ["[1, 2]\n", "providers: {}\n"])
def test_errors_without_a_place_still_name_the_file(tmp_path: Path, text: str) -> None:
    code, err = check(tmp_path, text)
    assert code == 1 and err.startswith("edge.yaml:") and "\n" in err


SHARED_BUDGETS = (
    HEAD
    + """\
shared_state: {redis_url: "redis://127.0.0.1:9/0"}
budgets:
  limits: [{name: day, scope: global, limit_usd: 5}]
"""
)


def test_budgets_in_redis_beside_a_ledger_per_instance_are_noted(tmp_path: Path) -> None:
    """A Redis restarted empty is filled from one instance's ledger: the others' spend is
    forgotten (red3M F5). Valid, so `check` says OK, and notes it; a shared PostgreSQL
    ledger holds every instance's spend, and is not noted."""
    code, err = check(tmp_path, SHARED_BUDGETS)
    assert code == 0, err
    assert (
        "note: shared_state with a sqlite ledger: after Redis restarts empty, budgets count this instance's"
        " spend only, and the other instances' spend may be spent again; share one PostgreSQL ledger"
    ) in err
    shared_pg = SHARED_BUDGETS + "ledger: {backend: postgres, dsn: 'postgresql://u@127.0.0.1:9/db'}\n"
    code, err = check(tmp_path, shared_pg)
    assert code == 0 and "shared_state" not in err, err


def test_serve_logs_the_note_on_budgets_in_redis_beside_a_ledger_per_instance(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edgeroute.server import create_app

    path = tmp_path / "edge.yaml"
    path.write_text(SHARED_BUDGETS + f"ledger: {{backend: sqlite, path: {tmp_path / 'ledger.db'}}}\n")
    with caplog.at_level("WARNING", logger="edgeroute.cost"):
        create_app(config_mod.load(path), str(path))
    assert any(
        "after Redis restarts empty, budgets count this instance's spend only" in r.message for r in caplog.records
    )
