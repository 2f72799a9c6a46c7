"""What a new operator met walking the README from a clean clone: each test runs the command
as the README gives it and asserts what the terminal shows (no traceback, each problem once,
tables that read right, numbers that agree with the README)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from edgeroute import cli
from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, eventually, simple_config
from tests.readme_pages import manual_text
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _two_upstream_config


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's errors, and the router tools' one-line errors
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", *args],
        capture_output=True, text=True, timeout=120, env=env or dict(os.environ),
    )  # fmt: skip


# -- edgeroute check FILE -------------------------------------------------------------------------


_README_EXAMPLE = """\
providers:
  openai: {kind: openai, base_url: "https://api.openai.com/v1"}
deployments:
  gpt-4.1-openai: {provider: openai, model: gpt-4.1, tags: [eu]}
models:
  gpt-4.1:
    deployments: [gpt-4.1-openai]
    stratgy: weighted
rules:
  - name: r
    then: {require_tags: [eu, euu]}
    when:
      patterns: [ok,
          "(?=x)"]
"""


def test_the_readme_error_example_is_three_runs_of_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's block of `edgeroute check` errors, one per stage, reproduced line for line:
    each run prints the first failing stage's error, and the next shows once it is fixed."""
    text = manual_text()
    start = text.index("each after fixing what the run before reported")
    start = text.index("```\n", start) + 4
    expected = text[start : text.index("```", start)].splitlines()
    monkeypatch.chdir(tmp_path)
    path = Path("edge.yaml")
    path.write_text(_README_EXAMPLE)
    seen = []
    for fix in (("stratgy", "strategy"), ("euu]", "eu]"), None):
        code, _, err = run(["check", "edge.yaml"], capsys)
        assert code == 1
        seen += err.splitlines()
        if fix is not None:
            path.write_text(path.read_text().replace(*fix))
    assert seen == expected


def test_a_config_that_is_not_utf8_is_an_error_with_its_line(tmp_path: Path) -> None:
    """A config saved as Latin-1 (or a binary file named by mistake): one line naming the file,
    the line and column of the first bad byte; it was a UnicodeDecodeError traceback."""
    path = tmp_path / "edge.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n")
    r = _cli("check", str(path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == f"{path}:2:12: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_an_empty_config_says_it_is_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("# nothing yet\n")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1
    assert "NoneType" not in err
    assert err.strip() == f"{path}: the config is empty (it needs at least providers, deployments and models)"


def test_a_list_at_the_top_says_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("- providers\n- models\n")
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1 and f"{path}:1:1: (top level): expected a mapping of sections" in err and "got a list" in err


def test_each_unresolved_key_token_is_reported_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`check` printed every virtual key's unset `env:` token twice."""
    monkeypatch.delenv("WALK_UNSET_TOKEN", raising=False)
    path = tmp_path / "edge.yaml"
    path.write_text(
        "providers: {a: {base_url: 'http://127.0.0.1:9/v1'}}\n"
        "deployments: {d: {provider: a, model: m}}\n"
        "models: {m: {deployments: [d]}}\n"
        "keys:\n"
        "  root: {token: env:WALK_UNSET_TOKEN, role: admin}\n"
    )
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1
    assert err.splitlines() == [f"{path}:5:10: keys.root.token: environment variable WALK_UNSET_TOKEN is not set"]


def test_the_errors_of_a_stage_come_in_file_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Read top to bottom, as an operator fixes them (they came in the schema's order: a
    provider's nested key before the provider's own, the top level's typo last)."""
    path = tmp_path / "edge.yaml"
    path.write_text(
        "sever: {port: 1}\n"
        "providers:\n"
        "  a: {base_url: 'http://x/v1', kindd: openai, timeouts: {conect: 5}}\n"
        "deployments: {d: {provider: a, model: m}}\n"
        "models: {m: {deployments: [d], hedge: {percentil: 95}}}\n"
    )
    code, _, err = run(["check", str(path)], capsys)
    assert code == 1
    places = [tuple(map(int, line.split(":")[1:3])) for line in err.replace(str(path), "edge.yaml").splitlines()]
    assert places == [(1, 1), (3, 32), (3, 58), (5, 40)], err


async def test_a_reload_of_a_file_that_is_not_utf8_is_refused_as_invalid(start_upstream: Any, tmp_path: Path) -> None:
    """`POST /admin/reload` on a file saved as Latin-1 answers as for any invalid file (400, the
    running config kept, the line named); it answered 500 "Internal error"."""
    up = await start_upstream()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(simple_config({"a": up})))
    app = create_app(config_mod.load(path), str(path))
    server = ProxyTestServer(app)
    await server.start_server()
    try:
        path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{server.port}/admin/reload") as r:
            body = await r.json()
        assert r.status == 400 and body["error"]["code"] == "invalid_config"
        assert "not UTF-8 text" in str(body["error"]["problems"])
    finally:
        await server.close()


# -- edgeroute logs / stats -----------------------------------------------------------------------


async def test_logs_and_stats_tables_read_right(start_upstream: Any, tmp_path: Path) -> None:
    """The logs table's columns line up under its header (a request id is 28 characters; the
    column was 22), `stats` without a group prints its one total once (it printed two identical
    unlabelled rows), a time-bucketed table labels its TOTAL, and the percentile bound printed is
    the README's."""
    good = await start_upstream()
    cfg = _two_upstream_config(good.base_url, good.base_url, tmp_path / "log.db")
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()

        async def logged() -> subprocess.CompletedProcess[str] | None:
            r = await asyncio.to_thread(_cli, "logs", "-c", str(path))
            return r if r.returncode == 0 and len(r.stdout.splitlines()) == 3 else None

        table = (await eventually(logged, "two requests in the log")).stdout.splitlines()
    header, row = table[0], table[1]
    for column, value in zip(header.split(), row.split()[1:], strict=False):  # the row's date has a space
        if column in ("id", "model", "deployment", "status"):
            assert row.index(value) == header.index(column), (column, header, row)

    plain = await asyncio.to_thread(_cli, "stats", "-c", str(path))
    lines = [x for x in plain.stdout.splitlines() if x.strip()]
    assert lines[0].split()[0] == "requests" and lines[1].split()[0] == "2"
    assert len(lines) == 3 and lines[2].startswith("percentiles within"), plain.stdout

    bucketed = await asyncio.to_thread(_cli, "stats", "-c", str(path), "--bucket", "300", "--group-by", "model")
    total = [x for x in bucketed.stdout.splitlines() if x.startswith("TOTAL")]
    assert len(total) == 1 and total[0].split()[1] == "2", bucketed.stdout

    readme_bound = re.search(r"within\s+±([\d.]+) % of the exact value", manual_text())
    assert readme_bound is not None
    assert f"percentiles within ±{readme_bound.group(1)} %" in plain.stdout


# -- edgeroute router -----------------------------------------------------------------------------


def test_an_unknown_router_command_names_all_five(capsys: pytest.CaptureFixture[str]) -> None:
    """It listed train, eval and shadow only (calibrate and replay have a parser of their own)."""
    code, _, err = run(["router", "bogus"], capsys)
    assert code == 2
    assert "unknown command 'bogus' (one of: train, eval, calibrate, replay, shadow)" in err


def _outcomes(tmp_path: Path) -> Path:
    path = tmp_path / "outcomes.jsonl"
    rows = [
        {"prompt": f"question {i}", "model": m, "score": s, "cost_usd": c}
        for i in range(4)
        for m, s, c in (("gpt-4o", 1.0, 0.01), ("gpt-4o-mini", 0.5, 0.001))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_router_replay_without_a_policy_model_says_which_to_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`router replay -c FILE --outcomes F` on a config without a model `auto` (the default
    --model) raised the core's UnknownModelError as a traceback."""
    cfg = {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}},
        "deployments": {"d": {"provider": "a", "model": "gpt-4o"}},
        "models": {"gpt-4o": {"deployments": ["d"]}},
    }
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["router", "replay", "-c", str(path), "--outcomes", str(_outcomes(tmp_path))], capsys)
    assert code == 2
    assert f"{path} has no model 'auto'" in err and "--model (one of: gpt-4o)" in err


def test_router_tools_name_a_missing_file_or_a_bad_config(tmp_path: Path) -> None:
    """Run as the user runs them: one line each, no traceback."""
    missing = tmp_path / "nope.jsonl"
    r = _cli("router", "calibrate", "--outcomes", str(missing), "--strong", "a", "--weak", "b", "--strong-share", "0.3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"edgeroute router: {missing}: cannot read: No such file or directory"

    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {deployments: [d]}}\n")
    r = _cli("router", "replay", "-c", str(bad), "--outcomes", str(_outcomes(tmp_path)))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{bad}:1:1: providers: Field required" in r.stderr


# -- what a reload applies ------------------------------------------------------------------------


def _restart_sentence() -> str:
    text = " ".join(manual_text().split())
    start = text.index("Changes to `ledger`")
    return text[start : text.index("refused with the list", start)]


def test_the_readme_names_every_setting_a_reload_refuses() -> None:
    """The Uptime section said budgets and rate limits take a restart (they reload, as Cost
    control says) and left out request_log, cache, tracing and server settings that do."""
    from edgeroute import reload

    sentence = _restart_sentence()
    for section in reload._AT_START:
        assert f"`{section}`" in sentence, section
    for field in reload._SERVER_AT_START:
        assert f"`server.{field}`" in sentence, field
    assert "`budgets`" not in sentence and "`rate_limits`" not in sentence


def test_budgets_and_rate_limits_reload_without_a_restart() -> None:
    from edgeroute.reload import restart_only_changes

    base = {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}},
        "deployments": {"d": {"provider": "a", "model": "gpt-4o", "price": "catalogue"}},
        "models": {"m": {"deployments": ["d"]}},
        "budgets": {"limits": [{"name": "b", "scope": "global", "limit_usd": 10, "period": "month"}]},
        "rate_limits": {"models": {"m": {"rpm": 10}}},
    }
    changed = {
        **base,
        "budgets": {"limits": [{"name": "b", "scope": "global", "limit_usd": 5, "period": "month"}]},
        "rate_limits": {"models": {"m": {"rpm": 5}}},
    }
    old, new = config_mod.parse(base, "a.yaml"), config_mod.parse(changed, "b.yaml")
    assert restart_only_changes(old, new) == []
    moved = config_mod.parse({**changed, "request_log": {"retention_days": 3}}, "c.yaml")
    assert restart_only_changes(old, moved) == ["request_log: changed; this section takes effect on restart"]


# -- edgeroute keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["keys", "create", "--expires", "soon"], "error: --expires: 'soon' is not a span from now (30d, 12h)"),
        (["keys", "create", "--expires", "tomorrow-ish"], "error: --expires: 'tomorrow-ish' is not a span"),
        (["keys", "create", "--metadata", "{bad"], "error: --metadata: not JSON"),
        (["keys", "rotate", "k1", "--grace", "forever"], "error: --grace: 'forever' is not a span"),
    ],
)
def test_keys_name_the_flag_they_cannot_read(argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`keys create --expires soon` was a ProxyError traceback about 'since'; nothing is sent."""
    code, _, err = run([*argv, "--url", "http://127.0.0.1:9"], capsys)  # never reached
    assert code == 2 and err.startswith(said), err
    assert "since" not in err


def test_prices_list_for_a_provider_it_does_not_know_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """`prices list --provider opnai` printed an empty table and exited 0."""
    code, out, err = run(["prices", "list", "--provider", "opnai"], capsys)
    assert code == 1 and out == ""
    assert "no model of provider 'opnai' in the catalogue (providers: " in err and "openai" in err
    code, out, _ = run(["prices", "list", "--provider", "openai"], capsys)
    assert code == 0 and "gpt-4o " in out


# -- edgeroute demo -------------------------------------------------------------------------------


def test_the_tour_only_demo_names_no_url_it_has_closed() -> None:
    """`edgeroute demo --port 0 --tour-only` exits after the tour: it told the reader to curl
    its spend endpoint "while it runs", on a port already closed."""
    r = _cli("demo", "--port", "0", "--tour-only")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "Spend by model, from the demo's ledger:" in r.stdout
    assert "http://127.0.0.1:" not in r.stdout


def test_a_router_train_mistake_shows_the_usage_of_all_five_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """`router train --out x.erlm` (no outcomes) printed `usage: edgeroute router {train,eval,shadow}`."""
    code, _, err = run(["router", "train", "--out", "x.erlm"], capsys)
    assert code == 2 and "train needs --outcomes FILE, --from-log, or both" in err
    assert err.startswith("usage: edgeroute router [-h] {train,eval,calibrate,replay,shadow} ...")


# -- the README's API table -----------------------------------------------------------------------


def test_the_api_table_lists_every_admin_route() -> None:
    """Each admin route the server declares a role for is in the README's API table (it lacked
    the deployment changes and the router shadow report): the route's fixed part before its
    first `{placeholder}`, and each fixed segment after it, are in the table."""
    from edgeroute.roles import ROUTE_ROLES

    text = manual_text()
    start = text.index("| endpoint | what |")
    table = text[start : text.index("\n\n", start)]
    for route in ROUTE_ROLES:
        _, path = route.split(" ", 1)
        if not path.startswith("/admin/"):
            continue
        head, *rest = path.split("/{")
        assert head in table, route
        for tail in rest:
            fixed = tail.partition("}")[2]
            assert fixed in table, route


# -- a clean clone's newest dependencies ----------------------------------------------------------


def test_the_no_retry_client_is_given_the_asyncio_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `connect` hands redis-py, whichever redis-py is installed (8.1 accepts the sync
    Retry silently, 8.2 warns): the asyncio Retry, which every version since 4.2 has."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as AsyncRetry

    from edgeroute import redis_client

    given: dict[str, Any] = {}
    monkeypatch.setattr(aioredis.Redis, "from_url", classmethod(lambda cls, url, **kw: given.update(kw)))
    redis_client.connect("redis://127.0.0.1:6379/15", no_retry=True)
    assert isinstance(given["retry"], AsyncRetry)
