"""The command line as a user types it: the version, defaults from the environment, `route`
without a guessed model, `spend --by` matching the admin API, help on every option."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edgeroute import _core
from edgeroute.cli import build_parser, main
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import SqliteBackend
from edgeroute.cost.reports import GROUPS
from tests.serve_support import free_port
from tests.test_cost_ledger import _record

ONE_MODEL = """\
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
deployments:
  d: {provider: p, model: gpt-4o-mini}
models:
  gpt-4o-mini: {deployments: [d]}
"""
TWO_MODELS = ONE_MODEL + "  gpt-4o: {deployments: [d]}\n"


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edgeroute ARGV` in this process, with only `env` of the EDGEROUTE_* variables set."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("EDGEROUTE_")}
    out, err = io.StringIO(), io.StringIO()
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        for k in [k for k in os.environ if k.startswith("EDGEROUTE_")]:
            del os.environ[k]
        os.environ.update(saved)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("edgeroute ") and f"(core {_core.__version__})" in r.stdout


def test_the_config_may_come_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(ONE_MODEL)
    r = run("check", env={"EDGEROUTE_CONFIG": str(cfg)})
    assert r.returncode == 0 and f"{cfg}: OK" in r.stdout, r.stderr
    r = run("route", "hello", env={"EDGEROUTE_CONFIG": str(cfg)})
    assert r.returncode == 0 and "deployment: d" in r.stdout, r.stderr
    r = run("check")
    assert r.returncode == 2 and "config" in r.stderr  # neither given: a usage error, not a traceback
    other = tmp_path / "other.yaml"
    other.write_text("providers: {}\n")
    r = run("check", str(cfg), env={"EDGEROUTE_CONFIG": str(other)})
    assert r.returncode == 0, r.stderr  # the argument wins over the environment


def test_route_does_not_guess_a_model(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(TWO_MODELS)
    r = run("route", "hello", "-c", str(cfg))
    assert r.returncode == 2 and "--model" in r.stderr and "gpt-4o-mini, gpt-4o" in r.stderr
    r = run("route", "hello", "-c", str(cfg), "-m", "gpt4o")
    assert r.returncode == 2 and "has no model 'gpt4o' (did you mean 'gpt-4o'?)" in r.stderr
    r = run("route", "hello", "-c", str(cfg), "-m", "gpt-4o")
    assert r.returncode == 0 and "model:      gpt-4o\n" in r.stdout, r.stderr


def test_spend_groups_are_the_admin_apis() -> None:
    spend = _subparsers(build_parser())["spend"]
    by = next(a for a in spend._actions if a.dest == "by")
    assert list(by.choices or []) == list(GROUPS)  # /admin/spend?by= accepts exactly GROUPS


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help() -> None:
    parser = build_parser()
    missing = [
        f"{name} {action.dest}"
        for name, p in [("edgeroute", parser), *_subparsers(parser).items()]
        for action in p._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction) and not action.help
        and action.dest != "rest"  # bench and router have parsers of their own
    ]  # fmt: skip
    assert not missing


def test_log_level_from_the_environment_is_checked(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    r = run("serve", "-c", missing, env={"EDGEROUTE_LOG_LEVEL": "Debug"})
    assert r.returncode == 1 and "cannot read" in r.stderr  # the level was accepted; the config was not
    r = run("serve", "-c", missing, env={"EDGEROUTE_LOG_LEVEL": "loud"})
    assert r.returncode == 2 and "EDGEROUTE_LOG_LEVEL='loud' is not one of debug, info, warning, error" in r.stderr


def test_serve_listens_where_the_environment_says(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(ONE_MODEL + "ledger: {backend: memory}\n")
    port = free_port()
    env = {"EDGEROUTE_CONFIG": str(cfg), "EDGEROUTE_HOST": "127.0.0.1", "EDGEROUTE_PORT": str(port)}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve"], env=clean | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1].decode()
                assert time.monotonic() < deadline, "the proxy did not listen on EDGEROUTE_PORT"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    r = run("serve", env={**env, "EDGEROUTE_PORT": "http"})
    assert r.returncode == 2 and "not a port number: 'http'" in r.stderr


def test_spend_by_each_group_runs(tmp_path: Path) -> None:
    db = tmp_path / "spend.db"
    ledger = Ledger(SqliteBackend(db), flush_interval=0.2)
    ledger.record(_record(0))
    ledger.close()
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(ONE_MODEL + f"ledger: {{backend: sqlite, path: {db}}}\n")
    for by in GROUPS:
        r = run("spend", "-c", str(cfg), "--by", by, "--format", "json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["by"] == by and report["total"]["requests"] == 1
