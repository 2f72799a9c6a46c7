"""Config versions, diffs and the audit log with alert and budget webhooks written literally.

A Slack incoming webhook's URL is its credential (whoever holds it posts to the channel),
as `alerts.webhooks` says. Every view of the config masks literal credentials, but a webhook
URL written in the file (a budget's `notify` webhook cannot be a reference at all) was shown
as written to any `viewer` key: in `GET /admin/config`, a version, a diff, and the audit
entry of a budget change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import simple_config
from tests.governance_support import call, write_config

ALERT_URL = "https://hooks.slack.com/services/T0AAAA/B0BBBB/alertsSecretPart1234"
BUDGET_URL = "https://hooks.slack.com/services/T0AAAA/B0CCCC/budgetSecretPart5678"
VIEWER = "tok-viewer"


async def test_webhook_urls_are_masked_in_every_view_of_the_config(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEROUTE_TEST_HOOK_URL", "https://ops.example.invalid/hook")
    up = await start_upstream()
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "l.db")})
    cfg["keys"] = {"root": {"token": "tok-admin", "role": "admin"}, "look": {"token": VIEWER, "role": "viewer"}}
    cfg["alerts"] = {
        "webhooks": {"chat": {"url": ALERT_URL, "format": "slack"}, "ref": {"url": "env:EDGEROUTE_TEST_HOOK_URL"}}
    }
    notify = {"at_percent": 80, "action": "notify", "webhook": BUDGET_URL}
    cfg["budgets"] = {"limits": [{"name": "month", "scope": "global", "limit_usd": 100, "actions": [notify]}]}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        cfg["budgets"]["limits"][0]["limit_usd"] = 200  # a budget change: audited before and after
        cfg["alerts"]["webhooks"]["chat"]["url"] = ALERT_URL + "x"
        write_config(path, cfg)
        status, _ = await call("POST", url + "/admin/reload", "tok-admin")
        assert status == 200
        seen = {}
        for what in ("/admin/config", "/admin/config/versions/1", "/admin/config/diff?from=1&to=2", "/admin/audit"):
            status, body = await call("GET", url + what, VIEWER)
            assert status == 200, body
            seen[what] = body
    finally:
        await server.close()
    text = str(seen)
    assert "alertsSecretPart" not in text and "budgetSecretPart" not in text
    current = seen["/admin/config"]["config"]
    assert current["alerts"]["webhooks"]["chat"]["url"] == "****"
    assert current["alerts"]["webhooks"]["ref"]["url"] == "env:EDGEROUTE_TEST_HOOK_URL"  # references are shown
    assert current["budgets"]["limits"][0]["actions"][0]["webhook"] == "****"
    assert current["budgets"]["limits"][0]["limit_usd"] == 200
    assert any(e["action"] == "budget.changed" for e in seen["/admin/audit"]["entries"])
