"""The README's first command: `edgeroute demo` runs the guided tour on bundled mocks."""

from __future__ import annotations

import subprocess
import sys


def test_demo_tour_shows_routing_failover_and_spend() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgeroute", "demo", "--port", "0", "--tour-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = {line.split("  ")[0]: line for line in out.splitlines() if line.strip()}
    assert "gpt-4o-eu" in lines["rule: PII stays in EU"] and "pii-stays-in-eu" in lines["rule: PII stays in EU"]
    assert "llama-budget" in lines["cheapest deployment"]
    outage = lines["outage at openai-us"]
    assert "gpt-4o-eu" in outage and "  2  " in outage  # failed over on the second attempt
    assert "pii-stays-in-eu: pii=payment_card" in out
    assert "Spend by model" in out and "TOTAL" in out and "savings vs. most expensive model" in out
    assert "Traceback" not in r.stderr


def test_demo_stopped_by_sigterm_leaves_no_temporary_ledger(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`timeout`, `kill` or a service manager end the demo as Ctrl-C does: its ledger goes."""
    import os
    import signal
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        for line in proc.stdout:  # serving once the banner names its address
            if "edgeroute demo is running at" in line or time.monotonic() > deadline:
                break
        assert list(tmp_path.glob("edgeroute-demo-*")), "the demo keeps its ledger in TMPDIR while it runs"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()  # only the process this test started
            proc.wait(10)
    assert not list(tmp_path.glob("edgeroute-demo-*"))


def test_the_commands_the_demo_prints_work_when_pasted_into_a_shell(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The banner's curl and SDK lines, run by bash exactly as printed. The SDK snippet was a
    here-document indented by two spaces: bash never saw its `PY` terminator and Python
    stopped at the first line with an IndentationError."""
    import os
    import re
    import shutil
    import signal
    import time

    if shutil.which("curl") is None:
        import pytest

        pytest.skip("needs curl")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)  # the banner says `python`: this interpreter
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        block: list[str] | None = None
        for line in proc.stdout:
            if block is not None:
                block.append(line)
                if "/v1/models" in line:  # the banner's last command
                    break
            elif line.startswith("Try it"):
                block = []
            assert time.monotonic() < deadline, "no banner"
        assert block, "the demo printed no commands"
        script = "set -e\n" + "".join(block)
        env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
        ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)
        assert ran.returncode == 0, ran.stderr
        assert "IndentationError" not in ran.stderr and "here-document" not in ran.stderr, ran.stderr
        assert "HTTP/1.1 200" in ran.stdout  # the curl with -i
        assert re.search(r"(gpt-4o-mini-us|llama-budget) Hello from ", ran.stdout), ran.stdout  # the SDK's
        assert '"object":"list"' in ran.stdout  # /v1/models
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the process this test started
            proc.wait(10)
