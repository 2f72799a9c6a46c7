"""The audit log records who tried what and how it ended, not only the changes that happened.

A reload refused as invalid (through `POST /admin/reload` or SIGHUP) and a test notification
sent to every alert webhook (`POST /admin/alerts/test`) were logged only: the audit log, which
operators query for who did what, did not show them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import eventually, routes_upstream, simple_config
from tests.governance_support import Instance, call, write_config

KEYS = {
    "root": {"token": "tok-admin-0123456789", "role": "admin"},
    "ops": {"token": "tok-operator-0123456789", "role": "operator"},
    "look": {"token": "tok-viewer-0123456789", "role": "viewer"},
}
VIEWER = "tok-viewer-0123456789"


async def _audit(url: str, action: str) -> list[dict[str, Any]]:
    status, body = await call("GET", f"{url}/admin/audit?action={action}", VIEWER)
    assert status == 200, body
    return list(body["entries"])


@pytest.fixture
async def receiver() -> Any:
    async def took(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async with routes_upstream(web.post("/hook", took)) as server:
        yield server.url + "/hook"


@pytest.fixture
async def served(start_upstream: Any, receiver: str, tmp_path: Path) -> Any:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = KEYS
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db")}
    cfg["alerts"] = {"webhooks": {"oncall": {"url": receiver}}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", path, cfg
    finally:
        await server.close()


async def test_a_reload_refused_as_invalid_is_audited_with_who_and_why(served: Any) -> None:
    url, path, cfg = served
    cfg["models"]["broken"] = {"deployments": ["no-such-deployment"]}
    write_config(path, cfg)
    status, body = await call("POST", url + "/admin/reload", "tok-operator-0123456789")
    assert status == 400 and body["error"]["code"] == "invalid_config"
    entries = await _audit(url, "config.reload_refused")
    assert len(entries) == 1, entries
    e = entries[0]
    assert e["actor"] == "ops" and e["target"] == "config"
    assert e["before"] == {"version": 1} and e["after"]["refused"] is True
    assert any("no-such-deployment" in p for p in e["after"]["problems"]), e
    # Nothing was applied: the running version is still the first, and no reload was audited.
    status, body = await call("GET", url + "/admin/config", VIEWER)
    assert body["version"] == 1 and "broken" not in body["config"]["models"]
    assert await _audit(url, "config.reload") == []


async def test_a_reload_refused_for_a_restart_only_change_is_audited(served: Any) -> None:
    url, path, cfg = served
    cfg["server"] = {"max_body_bytes": 4096}
    write_config(path, cfg)
    status, _ = await call("POST", url + "/admin/reload", "tok-admin-0123456789")
    assert status == 400
    (e,) = await _audit(url, "config.reload_refused")
    assert e["actor"] == "root" and any("max_body_bytes" in p for p in e["after"]["problems"]), e


async def test_a_test_notification_is_audited_with_who_and_what_was_queued(served: Any) -> None:
    url, _, _ = served
    status, body = await call("POST", url + "/admin/alerts/test", "tok-operator-0123456789")
    assert status == 200 and body == {"queued": ["oncall"]}
    status, body = await call("POST", url + "/admin/alerts/test?webhook=nope", "tok-admin-0123456789")
    assert status == 404
    (sent,) = await _audit(url, "alerts.test")
    assert sent["actor"] == "ops" and sent["after"] == {"queued": ["oncall"]}
    (refused,) = await _audit(url, "alerts.test_refused")
    assert refused["actor"] == "root" and refused["after"] == {"webhook": "nope", "queued": []}
    # A viewer may not send one: refused by role, so there is nothing to audit.
    status, _ = await call("POST", url + "/admin/alerts/test", VIEWER)
    assert status == 403
    assert len(await _audit(url, "alerts")) == 2


async def test_a_sighup_reload_refused_is_audited(start_upstream: Any, tmp_path: Path) -> None:
    """`edgeroute serve` re-reads its file on SIGHUP; an invalid one is refused, and audited."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = KEYS
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db"), "flush_interval": 0.05}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    server = Instance(path, tmp_path / "serve.log")
    try:
        server.wait_ready()
        cfg["models"]["m"]["deployments"] = ["gone"]
        write_config(path, cfg)
        os.kill(server.proc.pid, signal.SIGHUP)  # the process this test started

        async def audited() -> list[dict[str, Any]]:
            return await _audit(server.url, "config.sighup_refused")

        (e,) = await eventually(audited, "the refused SIGHUP reload in the audit log")
        assert e["actor"] == "signal:SIGHUP" and any("gone" in p for p in e["after"]["problems"]), e
    finally:
        server.stop()
