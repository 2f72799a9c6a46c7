"""Terminal injection through the operator's command line: client-chosen text (a requested
model name, recorded for a refused request) printed by `edgeroute stats` and `edgeroute logs`.

A model name is the client's to choose; an operator runs `edgeroute stats --group-by model`
or `edgeroute logs --id ...` in a terminal. Escape sequences there can retitle the window,
clear the screen, forge output lines or (on some terminals) write to the clipboard (OSC 52).
JSON output escapes C0 controls (ESC is `\\u001b`) but not the C1 ones (U+0080 to U+009F:
U+009B is CSI, U+009D OSC), which terminals that honour 8-bit controls act on.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.conftest import eventually, wait_ready
from tests.serve_support import start_serve
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _two_upstream_config

# ESC-based (7-bit) and C1 (8-bit) sequences, a line break with a forged row, a bidi override,
# bidi marks (right-to-left, Arabic letter mark) and invisible characters (soft hyphen, zero-width
# space, BOM), which reached `edgeroute logs` and `spend` raw.
EVIL = (
    "x\x1b]0;owned\x07\x1b]52;c;ZWNobyBwd25lZA==\x07\x9b2J\x9d0;t\x9c\n2026-01-01 forged row\u202eabc"
    "\u200fgpt\u061c-4\u00ad\u200b\ufeff"
)
_RAW_CONTROL = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200b\u200e\u200f\u061c\u00ad\ufeff]"
)


async def _logged_refusal(tmp_path: Path, start_upstream: Any) -> tuple[Path, str]:
    """A proxy with a request log in SQLite, one refused request for the model EVIL; the
    config's path and the refused request's id."""
    good = await start_upstream()
    cfg = _two_upstream_config(good.base_url, good.base_url, tmp_path / "log.db")
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        body = {"model": EVIL, "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(proxy.url + "/v1/chat/completions", data=orjson.dumps(body),
                          headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == 404

        async def logged() -> list[dict[str, Any]]:
            async with s.get(proxy.url + "/admin/requests") as r:
                return list((await r.json())["data"])

        rows = await eventually(logged, "the refused request in the request log")
    assert rows[0]["model"] == EVIL  # stored as sent: escaping is the printer's job
    return path, rows[0]["id"]


async def _cli(*args: str) -> str:
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edgeroute", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _assert_inert(stdout: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in _RAW_CONTROL.findall(stdout)})
    assert not found, f"raw control characters reached the terminal: {found}"
    assert not any(line.startswith("2026-01-01 forged") for line in stdout.splitlines())


async def test_terminal_injection_through_edgeroute_stats_grouped_by_model(start_upstream: Any, tmp_path: Path) -> None:
    """`edgeroute stats --group-by model` shows a model no route serves as one group, never the
    client's text (which `edgeroute logs` prints escaped); whatever it prints stays inert."""
    path, _ = await _logged_refusal(tmp_path, start_upstream)
    out = await _cli("stats", "-c", str(path), "--group-by", "model", "--since", "1h")
    _assert_inert(out)
    assert "(unrouted)" in out and "owned" not in out


async def test_terminal_injection_through_edgeroute_logs_json_outputs(start_upstream: Any, tmp_path: Path) -> None:
    """`edgeroute logs --id` and `--format jsonl` are JSON an operator reads in a terminal:
    C1 controls and bidi overrides come out as `\\u` escapes (still the same JSON value)."""
    path, rid = await _logged_refusal(tmp_path, start_upstream)
    one = await _cli("logs", "-c", str(path), "--id", rid)
    _assert_inert(one)
    assert orjson.loads(one)["model"] == EVIL
    lines = await _cli("logs", "-c", str(path), "--format", "jsonl")
    _assert_inert(lines)
    assert orjson.loads(lines.splitlines()[-1])["model"] == EVIL
    table = await _cli("logs", "-c", str(path))
    _assert_inert(table)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_terminal_injection_through_the_decision_log(
    start_upstream: Any, tmp_path: Path, log_format: str
) -> None:
    """`edgeroute serve` with the decision log on, in a terminal: the decision line (JSON in
    either format) names the client's model; it reaches stderr without raw controls, one line."""
    good = await start_upstream()
    cfg = _two_upstream_config(good.base_url, good.base_url, tmp_path / "log.db",
                               server={"decision_log": True, "log_format": log_format})  # fmt: skip
    serving = await start_serve(tmp_path / "edge.yaml", cfg, stdout=asyncio.subprocess.PIPE)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url, proc=proc)
        async with aiohttp.ClientSession() as s:
            body = {"model": EVIL, "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(url + "/v1/chat/completions", data=orjson.dumps(body),
                              headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                assert r.status == 404
            await asyncio.sleep(0.3)  # the decision line is written on the next loop turn
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    log = err.decode()
    decisions = [line for line in log.splitlines() if '"request_id"' in line and "owned" in line]
    assert len(decisions) == 1, log
    _assert_inert(log)
    assert orjson.loads(decisions[0])["model"] == EVIL  # the same value, escaped
