"""A second new operator's walk through the README: what the terminal showed where a command
was used as a newcomer uses it (port 0, a port already taken, a CLI without its server's
address or key, Ctrl-C, a ledger path that cannot be one). Each test runs the real CLI in a
subprocess and asserts what it prints."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ONE_MODEL = """\
providers:
  p: {base_url: "http://127.0.0.1:9/v1"}
deployments:
  d: {provider: p, model: gpt-4o-mini}
models:
  m: {deployments: [d]}
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEROUTE_")}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", *args],
        capture_output=True, text=True, timeout=timeout, env=env or _env(),
    )  # fmt: skip


def _config(tmp_path: Path, extra: str = "ledger: {backend: memory}\n") -> Path:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(ONE_MODEL + extra)
    return cfg


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the process this test started
            proc.wait(10)


# -- serve --port 0 and a port already taken ----------------------------------------------------


def test_serve_on_port_0_says_which_port_it_took(tmp_path: Path) -> None:
    """It printed `listening on http://127.0.0.1:0`: the one thing the reader needed was missing."""
    cfg = _config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
        assert m, line
        port = int(m.group(1))
        assert port != 0, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        _stop(proc)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_says_what_to_do(tmp_path: Path, workers: str) -> None:
    """It said `cannot listen on 127.0.0.1:P: error while attempting to bind on address
    ('127.0.0.1', P): address already in use`: the address twice, and nothing to do."""
    cfg = _config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _cli("serve", "-c", str(cfg), "--port", str(port), "--workers", workers)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in lines[0], r.stderr
    assert "--port" in lines[0] and "server.port" in lines[0], r.stderr
    assert "error while attempting" not in lines[0], r.stderr


# -- keys, config, audit: the CLI that talks to a running server ----------------------------------


def test_the_admin_cli_says_how_to_name_the_server_and_the_key(tmp_path: Path) -> None:
    """`edgeroute keys list` said `cannot reach http://127.0.0.1:8080: [Errno 111] Connection
    refused` and `401: Invalid or missing API key.`, neither naming the flag or variable that
    points it at the server or gives it a key."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = _cli("keys", "list", "--url", closed)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot reach {closed}" in r.stderr and "--url" in r.stderr and "EDGEROUTE_URL" in r.stderr, r.stderr

    cfg = _config(tmp_path, "ledger: {backend: memory}\nkeys:\n  root: {token: root-token-1, role: admin}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", proc.stdout.readline())
        assert m
        url = m.group(1)
        for argv, said in (
            (["config", "versions", "--url", url], "Give an admin key with --key or $EDGEROUTE_ADMIN_KEY"),
            (["audit", "--url", url, "--key", "wrong"], "Check the key given with --key or $EDGEROUTE_ADMIN_KEY"),
        ):
            r = _cli(*argv)
            assert r.returncode == 1 and r.stderr.startswith("error: 401: "), r.stderr
            assert said in r.stderr, r.stderr
        r = _cli("config", "versions", "--url", url, "--key", "root-token-1")
        assert r.returncode == 0 and "start" in r.stdout, r.stderr
        # A diff of a version with itself printed nothing at all.
        r = _cli("config", "diff", "1", "--url", url, "--key", "root-token-1")
        assert r.returncode == 0 and r.stdout == "", r.stderr
        assert "version 1 and the running one do not differ" in r.stderr, r.stderr
    finally:
        _stop(proc)


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_stops_a_bench_without_a_traceback() -> None:
    """Ctrl-C in `edgeroute bench run` (or `bench overhead`) printed a KeyboardInterrupt traceback."""
    with socket.socket() as s:  # a port nothing listens on: every request fails at once, the run goes on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "bench", "run", "--url", url, "--rate", "5", "--duration", "60",
         "--progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 60
        while b"req/s" not in seen:  # the progress line: the run has started
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk and time.monotonic() < deadline, seen.decode(errors="replace")
            seen += chunk
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()  # only the process this test started
            proc.wait(10)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "interrupted" in err


def test_a_signal_sent_as_soon_as_serve_says_listening_drains(tmp_path: Path) -> None:
    """`serve` printed "listening" before it set its SIGTERM and SIGINT handlers: a script (or a
    supervisor) that signalled it on that line killed it undrained (SIGTERM's default action,
    exit -15, nothing flushed) or got a KeyboardInterrupt traceback from asyncio's runner."""
    cfg = _config(tmp_path)
    outcomes = []
    for i in range(8):
        sig = (signal.SIGTERM, signal.SIGINT)[i % 2]
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert "listening on" in proc.stdout.readline()
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()  # only the process this test started
                proc.wait(10)
        outcomes.append((sig.name, proc.returncode, "draining" in out, "Traceback" in err))
    assert all(o[1:] == (0, True, False) for o in outcomes), outcomes


# -- a ledger path that cannot be one -------------------------------------------------------------


@pytest.mark.parametrize("where", ["a missing directory", "a directory"])
def test_a_ledger_path_that_cannot_be_a_file_says_why(tmp_path: Path, where: str) -> None:
    """Both said `unable to open database file (the file and its directory must be writable by
    this process ...)`: true of neither, so the reader checked permissions that were fine."""
    if where == "a directory":
        path, said = tmp_path, f"it is a directory (ledger.path names the database file, e.g. {tmp_path}/"
    else:
        path, said = tmp_path / "no-such-dir" / "spend.db", f"the directory {tmp_path / 'no-such-dir'} does not exist"
    cfg = _config(tmp_path, f"ledger: {{backend: sqlite, path: {path}}}\n")
    r = _cli("serve", "-c", str(cfg), "--port", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot open the spend ledger {path}: {said}" in r.stderr, r.stderr
    assert "writable" not in r.stderr, r.stderr


# -- the Deploy section: a config in a read-only directory -----------------------------------------

_READ_ONLY_ETC = """
set -e
mount --bind {etc} {etc}
mount -o remount,bind,ro {etc}
exec {python} -m edgeroute serve --config {etc}/edgeroute.yaml --port 0
"""


@pytest.mark.parametrize("ledger", ["default", "in the data directory"])
def test_a_config_in_a_read_only_directory_needs_a_ledger_path_elsewhere(tmp_path: Path, ledger: str) -> None:
    """The README's `docker run` mounts the config read-only in /etc/edgeroute, and the systemd
    unit makes /etc read-only: the default ledger, beside the config, cannot be opened there
    (the README gave no ledger path); with `ledger.path` in the data directory it serves."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"no user and mount namespaces here: {probe.stderr.decode()[:200]}")
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    data.mkdir()
    extra = "" if ledger == "default" else f"ledger: {{path: {data}/edgeroute-ledger.db}}\n"
    (etc / "edgeroute.yaml").write_text(ONE_MODEL + extra)
    script = tmp_path / "serve.sh"
    script.write_text(_READ_ONLY_ETC.format(etc=etc, python=sys.executable))
    proc = subprocess.Popen(
        ["unshare", "-r", "-m", "sh", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if ledger == "default":
            assert proc.wait(30) == 1, line
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert f"cannot open the spend ledger {etc}/edgeroute-ledger.db" in err, err
            assert "ledger.path in the config puts it elsewhere" in err, err
        else:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
            assert m, line + (proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
            with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/readyz", timeout=5) as r:
                assert r.status == 200
            assert (data / "edgeroute-ledger.db").exists()
    finally:
        _stop(proc)


def test_reports_before_the_first_serve_name_where_the_ledger_will_be(tmp_path: Path) -> None:
    """`edgeroute logs -c edge.yaml` said `the ledger edgeroute-ledger.db does not exist yet`:
    a bare name, relative to nothing the reader could tell, and no word of what makes it."""
    cfg = _config(tmp_path, "")
    for command in ("logs", "stats", "spend"):
        r = subprocess.run(
            [sys.executable, "-m", "edgeroute", command, "-c", cfg.name],
            capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"the ledger {tmp_path / 'edgeroute-ledger.db'} does not exist yet" in r.stderr, r.stderr
        assert "`edgeroute serve` with this config creates it" in r.stderr, r.stderr


def test_bench_mock_the_readme_points_to_serves_a_config_and_names_itself() -> None:
    """The README sends a new operator to `edgeroute bench mock --port 0` to try a config without
    provider keys; its help named it `python -m edgeroute.bench.faults`."""
    r = _cli("bench", "mock", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: edgeroute bench mock "), r.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "bench", "mock", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.fullmatch(r"listening port=(\d+)\n", proc.stdout.readline())
        assert m
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
        req = urllib.request.Request(
            f"http://127.0.0.1:{m.group(1)}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as answer:
            assert answer.status == 200 and b'"choices"' in answer.read()
    finally:
        _stop(proc)


def _an_address_of_this_host_not_loopback() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        except OSError:
            return None
        addr: str = s.getsockname()[0]
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def test_the_console_from_another_host_without_keys_says_what_to_do(tmp_path: Path) -> None:
    """A keyless server on 0.0.0.0 (the container's `EDGEROUTE_HOST`) refused `/ui/` from the
    docker host with `Admin endpoints answer only local clients when no keys are configured.`:
    no word of the console, nor of what would let the operator in."""
    addr = _an_address_of_this_host_not_loopback()
    if addr is None:
        pytest.skip("this host has no address but loopback")
    cfg = _config(tmp_path, 'ledger: {backend: memory}\nserver: {allowed_hosts: ["*"]}\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "-c", str(cfg), "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        m = re.search(r"listening on http://0\.0\.0\.0:(\d+) ", proc.stdout.readline())
        assert m
        for path in ("/ui/", "/admin/deployments"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://{addr}:{m.group(1)}{path}", timeout=10)
            assert refused.value.code == 403
            body = refused.value.read().decode()
            assert "web console" in body and "configure keys" in body and "viewer" in body, body
        with urllib.request.urlopen(f"http://{addr}:{m.group(1)}/v1/models", timeout=10) as r:
            assert r.status == 200  # the API itself is served to any client
    finally:
        _stop(proc)
