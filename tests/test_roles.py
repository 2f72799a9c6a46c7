"""Access roles: every admin route declares its role, and each role reaches what it should."""

from __future__ import annotations

import aiohttp
import pytest

from edgeroute import config as config_mod
from edgeroute import roles
from edgeroute.server import create_app


def _routes() -> set[str]:
    cfg = config_mod.parse(_cfg(), "test.yaml")
    app = create_app(cfg, "test.yaml")
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if roles.is_admin_path(path) and route.method != "HEAD":
            out.add(f"{route.method} {path}")
    return out


def _cfg() -> dict[str, object]:
    return {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }


def test_every_admin_route_declares_a_role() -> None:
    routes = _routes()
    assert routes, "the app has admin routes"
    undeclared = sorted(r for r in routes if r not in roles.ROUTE_ROLES)
    assert undeclared == [], f"admin routes without a role in roles.ROUTE_ROLES: {undeclared}"
    stale = sorted(r for r in roles.ROUTE_ROLES if r not in routes)
    assert stale == [], f"roles declared for routes that do not exist: {stale}"
    # A team's key reaches only declared routes (a misspelt entry would refuse a route it means).
    assert sorted(roles.TEAM_ROUTES - routes) == []


def test_role_ranks() -> None:
    assert roles.permits("admin", "operator") and roles.permits("operator", "viewer")
    assert not roles.permits("viewer", "operator") and not roles.permits("service", "viewer")
    assert not roles.permits(None, "viewer") and not roles.permits("batch-jobs", "viewer")
    assert roles.access_role("batch-jobs") == "service"


@pytest.mark.parametrize(
    ("token", "path", "method", "status"),
    [
        ("tok-viewer", "/admin/deployments", "GET", 200),
        ("tok-viewer", "/admin/reload", "POST", 403),
        ("tok-service", "/admin/deployments", "GET", 403),
        ("tok-plain", "/admin/deployments", "GET", 403),
        ("tok-operator", "/admin/deployments", "GET", 200),
        ("nope", "/admin/deployments", "GET", 401),
    ],
)
async def test_roles_on_admin_routes(start_proxy, token: str, path: str, method: str, status: int) -> None:
    cfg = _cfg() | {
        "keys": {
            "v": {"token": "tok-viewer", "role": "viewer"},
            "o": {"token": "tok-operator", "role": "operator"},
            "s": {"token": "tok-service", "role": "service"},
            "p": {"token": "tok-plain"},
        }
    }
    proxy = await start_proxy(cfg)
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, proxy.url + path, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        body = await r.json()
        assert r.status == status, body
        if status == 403:
            assert "needs a key with role" in body["error"]["message"]
