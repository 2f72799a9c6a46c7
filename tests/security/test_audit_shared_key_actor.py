"""Changes made with a shared `server.api_keys` key name that key in the audit log.

A shared key carries no identity (no key id), and `actor_of` fell back to where the call came
from: every admin write with one was audited as `anonymous@127.0.0.1`, alike for every shared
key and for a keyless loopback call. Now the actor is `shared:` and the first 12 hex of the
key's HMAC-SHA256 under the governance store's own random key (the key itself is never written,
and a copy of the audit alone cannot test guesses of it: red8 A1), on every admin write path:
reload, rollback (API and CLI), drain, the alert test, and the applied version's `applied_by`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import simple_config
from tests.governance_support import call, served_file, write_config

ONE, TWO = "shared-one-0123456789abcdef", "shared-two-0123456789abcdef"


def _store_key(path: Path) -> bytes:
    """The governance store's own key for shared keys' names (SQLite, next to the config)."""
    found = [p for p in path.parent.iterdir() if p.suffix == ".db"]
    for db in found:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            try:
                row = conn.execute("SELECT value FROM gov_secrets WHERE name = 'actors'").fetchone()
            except sqlite3.OperationalError:
                continue
            if row is not None:
                return bytes.fromhex(row[0])
    raise AssertionError(f"no actors key in {found}")


def _bare(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


ACTORS: dict[str, bytes] = {}


def _actor(key: str) -> str:
    return "shared:" + hmac.new(ACTORS["key"], key.encode(), hashlib.sha256).hexdigest()[:12]


def _cli(url: str, key: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEROUTE_ADMIN_KEY": key, "EDGEROUTE_URL": url}
    return subprocess.run([sys.executable, "-m", "edgeroute", *argv], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip


async def test_a_shared_keys_changes_are_audited_under_its_fingerprint(start_upstream: Any, tmp_path: Path) -> None:
    path = tmp_path / "edgeroute.yaml"
    cfg = simple_config({"a": await start_upstream(), "b": await start_upstream()})
    cfg["server"] = {"api_keys": [ONE, TWO]}
    cfg["alerts"] = {"webhooks": {"ops": {"url": "http://127.0.0.1:9/hook"}}}
    async with served_file(path, cfg) as url:  # version 1
        ACTORS["key"] = _store_key(path)
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload", ONE))[0] == 200  # version 2
        assert (await call("POST", url + "/admin/deployments/d-b/drain", TWO))[0] == 200  # version 3
        assert (await call("POST", url + "/admin/alerts/test", ONE))[0] == 200
        done = await asyncio.to_thread(_cli, url, TWO, "config", "rollback", "1")
        assert done.returncode == 0, done.stderr

        status, body = await call("GET", url + "/admin/audit?limit=50", ONE)
        assert status == 200, body
        by_action = {e["action"]: e["actor"] for e in body["entries"]}
        assert by_action["config.reload"] == _actor(ONE), body
        assert by_action["alerts.test"] == _actor(ONE), body
        assert by_action["config.rollback"] == _actor(TWO), body
        drained = [e for e in body["entries"] if e["target"] == "d-b" or "drain" in e["action"]]
        assert drained and {e["actor"] for e in drained} == {_actor(TWO)}, drained
        assert not [e for e in body["entries"] if e["actor"].startswith("anonymous")], body
        assert ONE not in json.dumps(body) and TWO not in json.dumps(body)
        # No bare hash of a key to test guesses against, whole or cut short.
        assert not [e for e in body["entries"] if any(_bare(k)[:8] in e["actor"] for k in (ONE, TWO))], body

        _, body = await call("GET", url + "/admin/config/versions", ONE)
        applied_by = {v["version"]: v["applied_by"] for v in body["versions"]}
        assert applied_by[2] == _actor(ONE) and applied_by[4] == _actor(TWO), applied_by

        # The CLI lists them so, and filters by them.
        listed = await asyncio.to_thread(_cli, url, ONE, "audit", "--actor", _actor(TWO), "--json")
        assert listed.returncode == 0, listed.stderr
        actions = {e["action"] for e in json.loads(listed.stdout)["entries"]}
        assert "config.rollback" in actions and "config.reload" not in actions, actions
        assert TWO not in listed.stdout

    async with served_file(path) as url:  # restarted: the store's key, so the same name
        assert (await call("POST", url + "/admin/reload", ONE))[0] == 200
        _, body = await call("GET", url + "/admin/audit?action=config.reload", ONE)
        assert body["entries"][0]["actor"] == _actor(ONE), body
