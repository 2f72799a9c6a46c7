"""The README's CLI section is the command line a user gets: each command it lists (and each
alternative of `a|b|c`) answers `--help`, the router's usage names the same subcommands, and
the top-level help names every environment variable the commands read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeroute import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def cli_block() -> list[str]:
    """The lines of the fenced block under the README's `## CLI` heading."""
    text = README.read_text()
    section = text[text.index("\n## CLI\n") :]
    start = section.index("```\n") + 4
    return section[start : section.index("```", start)].splitlines()


def listed_commands() -> list[list[str]]:
    """`edgeroute keys create|list ...` gives ["keys", "create"], ["keys", "list"], ..."""
    commands: list[list[str]] = []
    for line in cli_block():
        words = re.split(r"\s{2,}", line.strip())[0].split()  # the command, before its description
        if len(words) < 2 or words[0] != "edgeroute" or words[1].startswith("-"):
            continue
        subs: list[str] = []  # lower-case alternatives before the first option: `list|show MODEL|update`
        for word in words[2:]:
            if word.startswith(("-", "[", '"')):
                break
            subs += [w for w in word.split("|") if re.fullmatch(r"[a-z]+", w)]
        commands += [[words[1], sub] for sub in subs] or [[words[1]]]
    return commands


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's --help exits
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().out


def test_the_cli_block_lists_the_commands() -> None:
    names = {c[0] for c in listed_commands()}
    assert {"serve", "check", "demo", "route", "router", "keys", "config", "bench"} <= names


@pytest.mark.parametrize("command", listed_commands(), ids=" ".join)
def test_each_listed_command_answers_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run([*command, "--help"], capsys)
    assert code == 0, f"`edgeroute {' '.join(command)} --help` exited {code}"
    assert "usage:" in out


def test_router_usage_names_every_subcommand_the_readme_lists(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["router", "--help"], capsys)
    assert code == 0
    usage = re.search(r"usage: edgeroute router \{([a-z,]+)\}", out)
    assert usage is not None, out
    readme = {c[1] for c in listed_commands() if c[0] == "router"}
    assert set(usage.group(1).split(",")) == readme
    for name in readme:  # each one the usage names is served
        assert f"\n  {name} " in out


def test_top_level_help_names_every_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    for name in (cli.ENV_CONFIG, cli.ENV_HOST, cli.ENV_PORT, cli.ENV_LOG_LEVEL, cli.ENV_WORKERS):
        assert name in flat
    assert "EDGEROUTE_URL" in flat and "EDGEROUTE_ADMIN_KEY" in flat


def test_a_reader_that_goes_away_gets_no_traceback() -> None:
    """`edgeroute prices list | head -1`: the pipe closes early; the CLI stops quietly."""
    import subprocess
    import sys

    r = subprocess.run(
        f"{sys.executable} -m edgeroute prices list | head -c 1",
        shell=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.stdout == "#"
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


def test_logs_and_stats_take_the_config_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As `serve`, `check` and `spend` do: `EDGEROUTE_CONFIG` names the file, `-c` wins."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}},
        "deployments": {"d": {"provider": "a", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        "ledger": {"path": str(tmp_path / "l.db")},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "EDGEROUTE_CONFIG": str(path)}
    for cmd in (["logs", "--format", "jsonl"], ["stats"]):
        r = subprocess.run(
            [sys.executable, "-m", "edgeroute", *cmd], env=env, capture_output=True, text=True, timeout=60
        )
        assert f"{path}: the ledger" in r.stderr, (cmd, r.stderr)  # read that config (no ledger written yet)
    env.pop("EDGEROUTE_CONFIG")
    r = subprocess.run(
        [sys.executable, "-m", "edgeroute", "stats"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and "--config" in r.stderr
