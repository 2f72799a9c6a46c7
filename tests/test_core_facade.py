"""`edgeroute.core`: the one way a router is compiled from a config (the README's library example)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

from edgeroute import config, core

CONFIG = """\
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
deployments:
  eu: {provider: p, model: gpt-4o-mini, tags: [eu]}
  us: {provider: p, model: gpt-4o-mini}
models:
  m: {deployments: [eu, us]}
rules:
  - name: eu-only
    when: {tags: [eu]}
    then: {require_tags: [eu]}
"""
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})


def test_the_readme_example(tmp_path: Path) -> None:
    path = tmp_path / "edgeroute.yaml"
    path.write_text(CONFIG)
    router = core.build_router(config.load(path), str(path))
    decision = router.decide(BODY, tags=["eu"])
    names = router.deployment_names()
    assert decision.route == "m" and decision.rule == "eu-only" and [names[i] for i in decision.order] == ["eu"]
    assert decision.prompt_tokens > 0


def test_a_reload_keeps_the_router_working(tmp_path: Path) -> None:
    cfg = config.parse(yaml.safe_load(CONFIG))
    first = core.build_router(cfg)
    again = core.build_router(cfg, previous=first)
    assert again.decide(BODY).route == "m"


def test_model_files_are_read_relative_to_the_config(tmp_path: Path) -> None:
    data = yaml.safe_load(CONFIG)
    data["learning"] = {"task_model": "models/task.erlm"}
    cfg_path = tmp_path / "edge.yaml"
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, str(cfg_path))
    assert e.value.errors == [
        f"{cfg_path}: learning.task_model: cannot read {tmp_path / 'models' / 'task.erlm'}: No such file or directory"
    ]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "task.erlm").write_bytes(
        (Path(core.__file__).parent / "models" / core.BUILTIN_TASK).read_bytes()
    )
    assert core.learned_models(config.parse(data, str(cfg_path)), str(cfg_path))[0].startswith(b"ERLM")


def test_pattern_errors_speak_the_cores_dialect() -> None:
    assert core.pattern_error(r"ticket-\d+") is None
    assert core.pattern_error("(a") == "unclosed group"
    assert core.pattern_error(r"(a)\1") is not None  # Python accepts back-references; the core does not
