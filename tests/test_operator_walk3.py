"""A third new operator's walk through the README, from a fresh clone: what the terminal showed
where a command was run as a newcomer runs it (a count of one, a bench bounded by time, a
port already taken, a model file or a YAML brace gone wrong, a deployment without a price, a
command group without its command, a client without a key, a bad variable in the environment).
Each test runs the real CLI (or `edgeroute serve` with the openai SDK as its client) in a
subprocess and asserts what it prints."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_operator_walk2 import _stop as stop

ONE_MODEL = """\
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
deployments:
  d: {provider: p, model: gpt-4o-mini, price: catalogue}
models:
  m: {deployments: [d]}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", *args],
        capture_output=True, text=True, timeout=timeout, env=env or _env(),
    )  # fmt: skip


def _write(tmp_path: Path, text: str, name: str = "edge.yaml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(text)
    return cfg


def _closed_url() -> str:
    with socket.socket() as s:  # a port nothing listens on: every request fails at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# -- check: counts ----------------------------------------------------------------------------------


def test_check_counts_one_of_a_kind_in_the_singular(tmp_path: Path) -> None:
    """It printed `OK (1 providers, 1 deployments, 1 models, 1 rules)`."""
    cfg = _write(tmp_path, ONE_MODEL + "rules:\n  - {name: r, when: {keywords: [x]}, then: {route: m}}\n")
    r = _cli("check", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{cfg}: OK (1 provider, 1 deployment, 1 model, 1 rule)"
    two = ONE_MODEL.replace("  m: {deployments: [d]}\n", "  m: {deployments: [d]}\n  n: {deployments: [d]}\n")
    r = _cli("check", str(_write(tmp_path, two, "two.yaml")))
    assert r.returncode == 0 and "(1 provider, 1 deployment, 2 models, 0 rules)" in r.stdout, r.stdout


def test_serve_says_what_it_serves_in_the_singular(tmp_path: Path) -> None:
    """`edgeroute listening on ... (1 models, 1 deployments)`."""
    cfg = _write(tmp_path, ONE_MODEL + "ledger: {backend: memory}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.search(r"listening on http://127\.0\.0\.1:\d+ \(1 model, 1 deployment\)$", line.strip()), line
    finally:
        stop(proc)


# -- check: a deployment without a price ------------------------------------------------------------


def test_check_notes_a_deployment_without_a_price(tmp_path: Path) -> None:
    """A deployment without `price:` was silently free: spend and budgets counted $0 for it and
    `lowest_cost` preferred it, and `check` said only OK."""
    text = ONE_MODEL.replace("model: gpt-4o-mini, price: catalogue}", "model: my-own-model}")
    r = _cli("check", str(_write(tmp_path, text)))
    assert r.returncode == 0 and ": OK (" in r.stdout, r.stderr
    assert "note: deployment d has no price" in r.stderr, r.stderr
    assert "$0 in spend, budgets and lowest_cost" in r.stderr and "price: catalogue" in r.stderr, r.stderr
    # Priced, or free on purpose: nothing to note.
    for price in ("catalogue", "{input_per_mtok: 0, output_per_mtok: 0}"):
        priced = ONE_MODEL.replace("price: catalogue}", f"price: {price}}}")
        r = _cli("check", str(_write(tmp_path, priced, "priced.yaml")))
        assert r.returncode == 0 and r.stderr == "", r.stderr


# -- check: a model file, a YAML typo ---------------------------------------------------------------


def test_a_router_model_file_that_is_missing_or_not_one_is_shown_at_its_line(tmp_path: Path) -> None:
    """A missing file said `edge.yaml: learning.router_model: cannot read ...` (no line, where
    every other error names one); a file that is not a model said `edge.yaml: cannot load the
    routing models: invalid model file: ...`, naming neither the key nor the file."""
    cfg = _write(tmp_path, ONE_MODEL + "learning:\n  router_model: current.erlm\n")
    r = _cli("check", str(cfg))
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"{cfg}:8:3: learning.router_model: cannot read {tmp_path}/current.erlm: "), r.stderr
    (tmp_path / "current.erlm").write_bytes(b"not a model file at all, just some bytes")
    r = _cli("check", str(cfg))
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"{cfg}:8:3: learning.router_model: cannot load current.erlm: "), r.stderr
    assert "edgeroute router train" in r.stderr, r.stderr


def test_an_unclosed_brace_says_where_it_was_opened(tmp_path: Path) -> None:
    """A `{` left open on line 2 was reported at line 3 only (where the parser gave up), and a
    tab said only "found character '\\t' that cannot start any token"."""
    text = ONE_MODEL.replace('p: {base_url: "http://127.0.0.1:9/v1"}', 'p: {base_url: "http://127.0.0.1:9/v1"')
    cfg = _write(tmp_path, text)
    r = _cli("check", str(cfg))
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(f"{cfg}:3:1: invalid YAML: expected ',' or '}}'"), r.stderr
    assert "(while parsing a flow mapping that starts at 2:6)" in r.stderr, r.stderr
    cfg = _write(tmp_path, ONE_MODEL.replace("  m: {deployments", "\tm: {deployments"), "tab.yaml")
    r = _cli("check", str(cfg))
    assert r.returncode == 1 and "YAML indents with spaces: replace the tab" in r.stderr, r.stderr


# -- a command group without its command, a bad variable -------------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["prices"], "{list,show,update}"),
        (["keys"], "{create,list,show,revoke,rotate,update}"),
        (["config"], "{versions,show,diff,rollback}"),
        (["bench"], "{run,overhead,throughput,"),
    ],
)
def test_a_command_group_without_a_command_names_the_commands(argv: list[str], names: str) -> None:
    """`the following arguments are required: prices_command` (`action`, `cmd`): argparse's
    internal names, not what to type."""
    r = _cli(*argv)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "the following arguments are required: " + names in last, last
    assert not re.search(r"required: (prices_command|action|cmd)$", last), last


@pytest.mark.parametrize(("var", "said"), [("EDGEROUTE_PORT", "not a port number"), ("EDGEROUTE_WORKERS", "auto")])
def test_a_bad_serve_default_in_the_environment_names_the_variable(tmp_path: Path, var: str, said: str) -> None:
    """`EDGEROUTE_PORT=abc` said `argument --port: not a port number: 'abc'` to a command line
    that had no --port."""
    cfg = _write(tmp_path, ONE_MODEL + "ledger: {backend: memory}\n")
    r = _cli("serve", "-c", str(cfg), env=_env(**{var: "abc"}))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{var}='abc'" in last and said in last, last
    assert "argument --" not in last, last


# -- bench run ----------------------------------------------------------------------------------------


def test_bench_run_progress_under_duration_shows_the_time_bound() -> None:
    """Under `--duration 2` the bar filled with time but read `117/100000`: the request bound
    (the default --requests) that the run never reaches."""
    r = _cli("bench", "run", "--url", _closed_url(), "--rate", "20", "--duration", "2", "--progress", timeout=90)
    bar = r.stderr.strip().splitlines()[-1]  # text mode reads each \r as a line end: the last update
    assert "/100000" not in r.stderr, bar
    m = re.search(r"\] +(\d+\.\d)% (\d+) done .* +(\d+\.\d)/2s", bar)
    assert m, bar
    assert float(m[1]) >= 90.0 and int(m[2]) > 0, bar
    # Bounded by --requests (fewer than the rate sends in the duration): the count is the bound.
    r = _cli("bench", "run", "--url", _closed_url(), "--rate", "50", "--duration", "30", "--requests", "20",
             "--progress", timeout=90)  # fmt: skip
    bar = r.stderr.strip().splitlines()[-1]
    assert re.search(r"100\.0% 20/20 ", bar), bar


def test_bench_run_has_no_flags_for_a_proxy_it_does_not_start() -> None:
    """`bench run --no-pin` and `--profile` were accepted and did nothing: `run` loads the URLs
    it is given and starts no proxy to pin or profile."""
    help_text = _cli("bench", "run", "--help").stdout
    assert "--no-pin" not in help_text and "--profile" not in help_text, help_text
    assert "--model MODEL" in help_text and "the model each request names" in help_text, help_text
    overhead = _cli("bench", "overhead", "--help").stdout  # where a proxy is started, they stay
    assert "--no-pin" in overhead and "--profile" in overhead


# -- demo on a port already taken -------------------------------------------------------------------


def test_demo_on_a_port_in_use_says_it_once() -> None:
    """`cannot listen on 127.0.0.1:P: error while attempting to bind on address ('127.0.0.1', P):
    address already in use`: the address twice (as `serve` said before it was fixed)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli("demo", "--port", str(port), "--tour-only")
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"edgeroute demo: cannot listen on 127.0.0.1:{port}: Address already in use; try `edgeroute demo --port 0`"
    ], r.stderr


# -- a client without a key -------------------------------------------------------------------------


def test_a_client_without_a_key_is_told_how_to_send_one(tmp_path: Path) -> None:
    """Both a request without a key and one with a wrong key got `Invalid or missing API key.`:
    the first did not learn that it sent none, nor how to send one."""
    openai = pytest.importorskip("openai")
    cfg = _write(tmp_path, ONE_MODEL + "ledger: {backend: memory}\nkeys:\n  app: {token: app-token-1}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
        assert m
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            f"{m[1]}/v1/chat/completions", data=b'{"model": "m", "messages": []}',
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as got:
            urllib.request.urlopen(req, timeout=10)
        assert got.value.code == 401
        body = got.value.read().decode()
        assert "Missing API key: send one of this gateway's keys in the Authorization header (scheme: Bearer)" in body
        assert "or in the x-api-key header." in body and "REDACTED" not in body, body

        client = openai.OpenAI(base_url=f"{m[1]}/v1", api_key="wrong-token", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as wrong:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert wrong.value.status_code == 401
        assert "Invalid API key: it is not one of this gateway's keys." in str(wrong.value), str(wrong.value)
        assert wrong.value.code == "invalid_api_key"
    finally:
        stop(proc)


# -- router shadow without a candidate ----------------------------------------------------------------


def test_router_shadow_without_a_candidate_says_so_without_blaming_a_flag(tmp_path: Path) -> None:
    """`edgeroute router shadow -c FILE` said `--candidate: no candidate router is configured`
    to a command line without --candidate; with a candidate that saw no request, the cost
    line read `(xNone)`."""
    cfg = _write(tmp_path, ONE_MODEL)
    proc = subprocess.Popen(  # its ledger (and request log) is created at start
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
    finally:
        stop(proc)
    r = _cli("router", "shadow", "-c", str(cfg))
    assert r.returncode == 2, r.stdout
    assert r.stderr.startswith("edgeroute router shadow: no candidate router is configured"), r.stderr
    assert "--candidate" not in r.stderr and "learning.candidate_router" in r.stderr, r.stderr
    r = _cli("router", "shadow", "-c", str(cfg), "--candidate", "refined.erlm")
    assert r.returncode == 0, r.stderr
    assert "candidate refined.erlm: 0 policy-routed requests evaluated" in r.stdout, r.stdout
    assert "xNone" not in r.stdout and "(no requests to compare)" in r.stdout, r.stdout


# -- the governance and alert examples on a server without managed keys or webhooks -------------------


def test_keys_create_and_an_alert_test_say_what_is_missing(tmp_path: Path) -> None:
    """The README's `edgeroute keys create ...` said `set governance.managed_keys: true in the
    config`, not that the server must restart for it (a reload refuses the change); `POST
    /admin/alerts/test` without any webhook answered `{"queued": []}` and nothing else."""
    import json
    import urllib.request

    cfg = _write(tmp_path, ONE_MODEL + "ledger: {backend: memory}\nkeys:\n  root: {token: root-token-1, role: admin}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
        assert m
        r = _cli("keys", "create", "--team", "research", "--url", m[1], "--key", "root-token-1")
        assert r.returncode == 1, r.stdout
        assert "set governance.managed_keys: true in the config and restart the server" in r.stderr, r.stderr
        req = urllib.request.Request(
            f"{m[1]}/admin/alerts/test", method="POST", headers={"Authorization": "Bearer root-token-1"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body == {"queued": [], "note": "no webhook is configured (alerts.webhooks): no test was sent"}, body
    finally:
        stop(proc)


# -- a keyed request refused before it was routed ------------------------------------------------------


def _serve(cfg: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
    assert m, proc.stderr.read() if proc.stderr else ""
    return proc, m[1]


def _term(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)  # drains and flushes the ledger
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the process this test started
        proc.wait(10)


def _post(url: str, token: str, body: bytes) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_keyed_request_refused_before_routing_is_its_keys_in_the_log(tmp_path: Path) -> None:
    """`edgeroute logs --key app` did not list app's 404 (an unknown model) or 400 (a body that
    is not JSON): those rows had no key or team, as if sent anonymously, so a team's key never
    saw its own client's mistakes. They still take nothing from the key's RPM after a restart."""
    import json

    cfg = _write(tmp_path, ONE_MODEL + "keys:\n  app: {token: app-token-1, team: research, limits: {rpm: 2}}\n")
    proc, url = _serve(cfg)
    try:
        assert _post(url, "app-token-1", b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}') == 404
        assert _post(url, "app-token-1", b'{"model": "m", "messages": [') == 400
        assert _post(url, "app-token-1", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}') == 404
    finally:
        _term(proc)
    r = _cli("logs", "-c", str(cfg), "--key", "app", "--format", "jsonl")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(row["status"] for row in rows) == [400, 404, 404], r.stdout + r.stderr
    assert all(row["key"] == "app" and row["team"] == "research" for row in rows), rows
    # After the restart, the key's window holds none of those three (rpm 2): its next request
    # is routed and goes upstream (nothing listens there: a 502), not refused with a 429.
    proc, url = _serve(cfg)
    try:
        assert _post(url, "app-token-1", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}') == 502
    finally:
        _term(proc)
