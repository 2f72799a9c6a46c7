"""The audit log pages: no flood of new entries puts an older one out of reach.

`GET /admin/audit` returned at most 1000 entries, newest first, with no way to ask for older
ones: an operator who sent 1000 refused calls (each audited) pushed an admin's revocation out
of `since=1h`, findable only by guessing its action or actor. Each answer now names the
`next_before_id` to continue from, and `edgeroute audit` follows it for `--limit` entries
(or `--all`).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.governance.runtime import GOV
from edgeroute.server import create_app
from tests.conftest import simple_config
from tests.governance_support import call, write_config

ROOT = "tok-admin-0123456789"
OPS = "tok-operator-0123456789"
FLOOD = 1000


@pytest.fixture
async def flooded(start_upstream: Any, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A server whose audit log holds an admin's revocation, then 1000 refused operator calls;
    yields its URL and the revoked key's id."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}, "ops": {"token": OPS, "role": "operator"}}
    cfg["governance"] = {"managed_keys": True}
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db")}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    server = TestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    try:
        status, made = await call("POST", url + "/admin/keys", ROOT, {"name": "victim"})
        assert status == 201, made
        status, _ = await call("DELETE", url + f"/admin/keys/{made['id']}", ROOT)
        assert status == 200
        # The flood, written as the audit writes a refused call (the alerts test, which wrote one
        # per probe, is rate limited now): the pages are under test here, not the caller.
        gov = server.app[GOV]
        for i in range(FLOOD):
            await gov.audit("ops", "alerts.test_refused", "alerts", None, {"webhook": f"x{i}", "queued": []})
        yield url, made["id"]
    finally:
        await server.close()


def _revocation(entries: list[dict[str, Any]], key_id: str) -> bool:
    return any(e["action"] == "key.revoked" and e["target"] == key_id for e in entries)


async def test_the_next_page_reaches_an_entry_a_flood_pushed_past_the_first(flooded: tuple[str, str]) -> None:
    url, key_id = flooded
    status, first = await call("GET", url + "/admin/audit?since=1h&limit=1000", ROOT)
    assert status == 200, first
    assert len(first["entries"]) == 1000 and not _revocation(first["entries"], key_id)
    assert first["next_before_id"] == first["entries"][-1]["id"]

    status, older = await call(
        "GET", url + f"/admin/audit?since=1h&limit=1000&before_id={first['next_before_id']}", ROOT
    )
    assert status == 200, older
    assert _revocation(older["entries"], key_id)
    assert older["next_before_id"] is None  # the log's start: nothing older
    assert all(e["id"] < first["next_before_id"] for e in older["entries"])


async def test_pages_cover_the_log_once_each_and_until_bounds_them(flooded: tuple[str, str]) -> None:
    url, _ = flooded
    seen: list[int] = []
    cursor = ""
    while True:
        status, page = await call("GET", url + f"/admin/audit?limit=300{cursor}", ROOT)
        assert status == 200, page
        seen += [e["id"] for e in page["entries"]]
        if page["next_before_id"] is None:
            break
        cursor = f"&before_id={page['next_before_id']}"
    assert seen == sorted(set(seen), reverse=True)  # newest first, none twice
    assert len(seen) >= FLOOD + 2

    status, all_of_it = await call("GET", url + "/admin/audit?limit=1000&action=key", ROOT)
    cut = max(e["ts"] for e in all_of_it["entries"])  # the revocation's time: before it, the creation alone
    status, before = await call("GET", url + f"/admin/audit?action=key&until={cut}", ROOT)
    assert status == 200, before
    assert [e["action"] for e in before["entries"]] == ["key.created"]

    for bad in ("before_id=0", "before_id=x", "until=soon"):
        status, body = await call("GET", url + f"/admin/audit?{bad}", ROOT)
        assert status == 400 and body["error"]["param"] == bad.split("=")[0], body


def _cli(url: str, *argv: str) -> dict[str, Any]:
    env = {**os.environ, "EDGEROUTE_ADMIN_KEY": ROOT, "EDGEROUTE_URL": url}
    out = subprocess.run(
        [sys.executable, "-m", "edgeroute", "audit", "--json", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    got: dict[str, Any] = json.loads(out.stdout)
    return got


async def test_the_cli_follows_the_pages_for_as_many_entries_as_asked(flooded: tuple[str, str]) -> None:
    url, key_id = flooded
    got = await asyncio.to_thread(_cli, url, "--since", "1h", "--limit", str(FLOOD + 1))
    assert len(got["entries"]) == FLOOD + 1  # two pages: 1000, then 1
    assert got["entries"][-1]["action"] == "key.revoked" and got["entries"][-1]["target"] == key_id
    assert got["next_before_id"] == got["entries"][-1]["id"]

    everything = await asyncio.to_thread(_cli, url, "--all")
    assert _revocation(everything["entries"], key_id) and everything["next_before_id"] is None
    ids = [e["id"] for e in everything["entries"]]
    assert ids == sorted(set(ids), reverse=True)

    rest = await asyncio.to_thread(_cli, url, "--before-id", str(got["next_before_id"]))
    assert [e["action"] for e in rest["entries"]] == ["key.created", "config.start"]
