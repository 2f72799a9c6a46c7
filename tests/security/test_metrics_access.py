"""`/metrics` names teams, routes and traffic: with keys in use it needs a viewer's key.

Prometheus sends its scrape credential as `Authorization: Bearer …`; a service key (an
application's) cannot read it, `server.metrics_public: true` opens it, and a keyless sidecar
answers it under the sidecar's own checks (Host, Origin)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import simple_config

KEYS = {
    "app": {"token": "tok-app-metrics-1", "team": "research"},
    "dash": {"token": "tok-viewer-metrics-1", "role": "viewer"},
    "ops": {"token": "tok-admin-metrics-1", "role": "admin"},
}


async def _status(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics", headers=headers or {}) as r:
        body = await r.read()
        return r.status, body


async def test_with_keys_metrics_need_a_viewer_key(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = KEYS
    proxy = await start_proxy(cfg)
    status, body = await _status(proxy.url)
    assert status == 401 and b"invalid_api_key" in body and b"edgeroute_" not in body
    status, body = await _status(proxy.url, {"Authorization": "Bearer not-a-key"})
    assert status == 401 and b"edgeroute_" not in body
    status, body = await _status(proxy.url, {"Authorization": "Bearer tok-app-metrics-1"})
    assert status == 403 and b"viewer" in body and b"research" not in body
    for token in ("tok-viewer-metrics-1", "tok-admin-metrics-1"):
        status, body = await _status(proxy.url, {"Authorization": f"Bearer {token}"})
        assert status == 200 and b"# TYPE edgeroute_requests_total counter" in body


async def test_metrics_public_opens_the_scrape(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream()
    cfg = simple_config({"a": up}, server={"metrics_public": True})
    cfg["keys"] = KEYS
    proxy = await start_proxy(cfg)
    status, body = await _status(proxy.url)
    assert status == 200 and b"edgeroute_requests_total" in body
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/stats") as r:
        assert r.status == 401  # only the scrape is opened


async def test_shared_api_keys_guard_metrics_too(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}, server={"api_keys": ["shared-metrics-secret-1"]}))
    assert (await _status(proxy.url))[0] == 401
    assert (await _status(proxy.url, {"Authorization": "Bearer shared-metrics-secret-1"}))[0] == 200


async def test_a_keyless_sidecar_serves_metrics_to_its_host_only(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    assert (await _status(proxy.url))[0] == 200
    # A web page (DNS rebinding) reaching the sidecar under another name is refused.
    assert (await _status(proxy.url, {"Host": "attacker.example"}))[0] == 403
