"""The console's HTTP side (no browser): what is served without a key, the headers, who may sign in."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from edgeroute.ui import CSP

KEYS = {
    "a": {"token": "tok-admin", "role": "admin"},
    "v": {"token": "tok-viewer", "role": "viewer"},
    "s": {"token": "tok-service", "role": "service"},
}


def _cfg(keys: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    if keys:
        cfg["keys"] = keys
    return cfg


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def test_shell_is_served_with_strict_headers_and_no_inline_script(start_proxy: Any) -> None:
    proxy = await start_proxy(_cfg(KEYS))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/ui", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/ui/"
        async with s.get(proxy.url + "/ui/") as r:  # no key: the shell holds no data
            html = await r.text()
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            assert r.headers["Content-Security-Policy"] == CSP
            assert "frame-ancestors 'none'" in CSP and "script-src 'self';" in CSP and "unsafe" not in CSP
            assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "<script>" not in html and 'style="' not in html  # CSP would refuse them
        async with s.get(proxy.url + "/ui/static/app.js") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
            assert r.headers["Content-Security-Policy"] == CSP
        async with s.get(proxy.url + "/ui/static/pages/overview.js") as r:
            assert r.status == 200
        for bad in (
            "/ui/static/../__init__.py",
            "/ui/static/%2e%2e/__init__.py",
            "/ui/static/__init__.py",
            "/ui/static/.hidden.js",
            "/ui/static/nope.js",
            "/ui/static/pages//overview.js",
        ):
            async with s.get(proxy.url + bad) as r:
                # 401 where the client resolved the `..` itself (outside the shell, a key is needed)
                assert r.status in (401, 404), bad
                assert "error" in await r.json()


@pytest.mark.parametrize(
    ("token", "signed_in", "role", "reason"),
    [
        ("tok-admin", True, "admin", None),
        ("tok-viewer", True, "viewer", None),
        ("tok-service", False, None, "role"),
        ("nope", False, None, "invalid_key"),
        (None, False, None, "key_required"),
    ],
)
async def test_session_says_who_may_use_the_console(
    start_proxy: Any, token: str | None, signed_in: bool, role: str | None, reason: str | None
) -> None:
    proxy = await start_proxy(_cfg(KEYS))
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/ui/session", headers=_bearer(token)) as r:
        body = await r.json()
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    assert body["signed_in"] is signed_in
    assert body.get("role") == role and body.get("reason") == reason
    if role == "viewer":
        assert "GET /admin/deployments" in body["routes"] and "POST /admin/reload" not in body["routes"]
    if role == "admin":
        assert "POST /admin/reload" in body["routes"]
    if not signed_in:
        assert "routes" not in body and "key" not in body


async def test_no_key_reaches_no_data(start_proxy: Any) -> None:
    proxy = await start_proxy(_cfg(KEYS))
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/deployments", "/admin/spend", "/admin/learning"):
            async with s.get(proxy.url + path) as r:
                assert r.status == 401, path


async def test_without_keys_the_console_is_for_loopback(start_proxy: Any) -> None:
    proxy = await start_proxy(_cfg())
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/ui/session") as r:
        body = await r.json()
    assert body["signed_in"] is True and body["auth"] == "loopback" and body["role"] == "admin"


async def test_without_keys_a_rebinding_page_gets_no_console(start_proxy: Any) -> None:
    """Keyless, the shell is a sidecar's like /admin: a foreign Host (DNS rebinding) is refused."""
    proxy = await start_proxy(_cfg())
    async with aiohttp.ClientSession() as s:
        for path in ("/ui/", "/ui/session", "/ui/static/app.js"):
            async with s.get(proxy.url + path, headers={"Host": "attacker.example"}) as r:
                assert r.status == 403, path
            async with s.get(proxy.url + path, headers={"Origin": "http://attacker.example"}) as r:
                assert r.status == 403, path
