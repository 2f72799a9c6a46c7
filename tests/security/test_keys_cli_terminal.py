"""Terminal injection through `edgeroute keys list` and `edgeroute audit`.

A managed key's `user` and `team` are chosen by whoever creates it: any admin key, a
managed one held to a team or a budget included. The tables of `edgeroute keys list`
printed them raw, so escape sequences reached the operator's terminal (retitle the
window, clear it, forge rows; OSC 52 writes the clipboard). Cells are now printed with
control characters, line separators and bidi overrides escaped (`--json` output is ASCII).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

import aiohttp

from tests.security.governed import ROOT

EVIL = "ops\x1b]0;owned\x07\x1b]52;c;ZWNobyBwd25lZA==\x07\x9b2J\n2026-01-01 forged row\u202eabc"
_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _cli(url: str, *argv: str) -> str:
    env = {**os.environ, "EDGEROUTE_ADMIN_KEY": ROOT, "EDGEROUTE_URL": url}
    out = subprocess.run(
        [sys.executable, "-m", "edgeroute", *argv], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_keys_list_escapes_client_chosen_user_and_team(governed: Any) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"name": "n", "role": "service", "team": EVIL, "user": EVIL}
        async with s.post(governed.url + "/admin/keys", json=body, headers={"Authorization": f"Bearer {ROOT}"}) as r:
            assert r.status == 201, await r.text()
    for argv in (("keys", "list"), ("audit", "--since", "1h")):
        out = await asyncio.to_thread(_cli, governed.url, *argv)
        assert not _RAW_CONTROL.findall(out), (argv, out)
        assert not any(line.startswith("2026-01-01 forged row") for line in out.splitlines())
    table = await asyncio.to_thread(_cli, governed.url, "keys", "list")
    assert "ops\\x1b]0;owned\\x07" in table  # shown, escaped
