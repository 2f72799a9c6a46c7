"""Every admin API answer and the console's JSON say `Cache-Control: no-store` and
`X-Content-Type-Options: nosniff` (redU L5): only `/ui/session` did, so a browser opening an
admin URL, or a caching forward proxy, could keep key lists, audit entries and stored prompts
on disk. The client API's answers are left as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import simple_config
from tests.test_governance_keys import _proxy

ROOT = "tok-root-0123456789"


async def test_admin_and_console_json_is_not_stored_nor_sniffed(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg: dict[str, Any] = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True}
    cfg["ledger"] = {"backend": "sqlite", "path": str(tmp_path / "ledger.db")}
    hdrs = {"Authorization": f"Bearer {ROOT}"}
    async with _proxy(cfg) as url, aiohttp.ClientSession() as s:
        answers = []
        for method, path, auth in [
            ("GET", "/admin/keys", True),
            ("POST", "/admin/keys", True),
            ("GET", "/admin/audit?limit=5", True),
            ("GET", "/admin/requests?limit=5", True),
            ("GET", "/admin/spend?by=model", True),
            ("GET", "/admin/config", True),
            ("GET", "/admin/deployments", True),
            ("GET", "/admin/keys", False),  # 401
            ("GET", "/admin/nothing-here", True),  # 404
            ("GET", "/ui/session", True),
        ]:
            kw: dict[str, Any] = {"headers": hdrs if auth else {}}
            if method == "POST":
                kw["json"] = {"name": "made"}
            async with s.request(method, url + path, **kw) as r:
                await r.read()
                answers.append(
                    (path, r.status, r.headers.get("Cache-Control"), r.headers.get("X-Content-Type-Options"))
                )
        assert {(st // 100) for _, st, _, _ in answers} >= {2, 4}, answers
        bad = [a for a in answers if a[2] != "no-store" or a[3] != "nosniff"]
        assert not bad, bad
        async with s.get(url + "/admin/keys", headers=hdrs) as r:
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            # nor framed by a browser without frame-ancestors, nor named in a Referer (huntUI #5)
            assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "no-referrer"
        async with s.get(url + "/metrics", headers=hdrs) as r:  # its series name keys and teams
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        async with s.get(url + "/ui/session", headers=hdrs) as r:  # the console's stricter policy stays
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        async with s.get(url + "/v1/models", headers=hdrs) as r:
            assert r.status == 200 and "Cache-Control" not in r.headers and r.headers["Server"] == "edgeroute"
