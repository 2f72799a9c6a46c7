"""Who may call what: the access roles and the least role each admin route needs.

Roles are ranked `viewer` < `operator` < `admin`; `service` keys reach only the API
(`/v1/*`). Every route under `/admin/` (and the console under `/ui/`) declares its role
here, by method and the route's canonical path; a route without a declaration is refused
to everyone (fail closed), and a test enumerates the app's routes against this table.
A key whose role is not one of these (a free-form role used by routing rules) is a
`service` key for access purposes.

A key bound to a team (`team:` on a config key, `--team` on a managed one) is a tenant's
key: whatever its role, it may call only the routes in `TEAM_ROUTES`, each of which answers
with its own team's data alone (`cost.keys.tenant_of` is the one place that says which
team a caller is confined to). Every other admin route describes or changes the whole
gateway (config, audit, alerts, the router's shadow, reload, drain) and is refused to it
with a 403: fail closed, a new route is global-only until it is listed here and filters.
"""

from __future__ import annotations

from typing import Literal, get_args

Role = Literal["service", "viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
_RANK: dict[str, int] = {role: i for i, role in enumerate(ROLES)}

# "METHOD /canonical/path" -> the least role that may call it.
ROUTE_ROLES: dict[str, Role] = {
    "GET /admin/deployments": "viewer",
    "GET /admin/spend": "viewer",
    "GET /admin/requests": "viewer",
    "GET /admin/requests/{id}": "viewer",
    "GET /admin/stats": "viewer",
    "GET /admin/budgets": "viewer",
    "GET /admin/learning": "viewer",
    "POST /admin/learning/reset": "admin",
    "GET /admin/router/shadow": "viewer",
    "POST /admin/reload": "operator",
    "GET /admin/alerts": "viewer",
    "POST /admin/alerts/test": "operator",
    "GET /admin/deployments/history": "viewer",
    # The console: its shell (page, scripts, /ui/session) holds no data and is served
    # without a key check (see `is_console_shell`); /ui/session checks the key itself.
    "GET /ui": "viewer",
    "GET /ui/": "viewer",
    "GET /ui/static/{name}": "viewer",
    "GET /ui/session": "viewer",
    "GET /admin/config": "viewer",
    "GET /admin/config/versions": "viewer",
    "GET /admin/config/versions/{version}": "viewer",
    "GET /admin/config/diff": "viewer",
    "POST /admin/config/rollback": "operator",
    "POST /admin/config/check": "viewer",
    "GET /admin/audit": "viewer",
    "POST /admin/keys": "admin",
    "GET /admin/keys": "admin",
    "GET /admin/keys/{id}": "admin",
    "PATCH /admin/keys/{id}": "admin",
    "DELETE /admin/keys/{id}": "admin",
    "POST /admin/keys/{id}/rotate": "admin",
    "POST /admin/deployments/{name}/drain": "operator",
    "POST /admin/deployments/{name}/undrain": "operator",
    "POST /admin/deployments": "admin",
    "PATCH /admin/deployments/{name}": "admin",
    "DELETE /admin/deployments/{name}": "admin",
}


# Routes a team-bound key may call (at its role): each filters to the caller's team in
# its query (request log, stats, spend, budgets, the learner's ratings) or in its key checks
# (keys), or holds no tenant data (the console's shell; deployments' health, which names no key, team or request).
TEAM_ROUTES: frozenset[str] = frozenset(
    {
        "GET /admin/requests",
        "GET /admin/requests/{id}",
        "GET /admin/stats",
        "GET /admin/spend",
        "GET /admin/budgets",
        "GET /admin/learning",
        "GET /admin/deployments",
        "GET /admin/deployments/history",
        "POST /admin/keys",
        "GET /admin/keys",
        "GET /admin/keys/{id}",
        "PATCH /admin/keys/{id}",
        "DELETE /admin/keys/{id}",
        "POST /admin/keys/{id}/rotate",
        "GET /ui",
        "GET /ui/",
        "GET /ui/static/{name}",
        "GET /ui/session",
    }
)


def team_may(method: str, canonical_path: str) -> bool:
    """Whether a team-bound key may call a route at all (its role is checked apart)."""
    if method == "HEAD":
        method = "GET"
    return f"{method} {canonical_path}" in TEAM_ROUTES


def access_role(role: str | None) -> Role:
    """The access role of a key's `role` field (free-form roles are service keys)."""
    return role if role in _RANK else "service"  # type: ignore[return-value]


def required_role(method: str, canonical_path: str) -> Role | None:
    """The least role for a route, or None when the route declares none."""
    if method == "HEAD":
        method = "GET"
    return ROUTE_ROLES.get(f"{method} {canonical_path}")


def rank(role: str | None) -> int:
    """How much a role may do (service 0 .. admin 3)."""
    return _RANK[access_role(role)]


def permits(role: str | None, required: Role) -> bool:
    """Whether a key with `role` may call a route that needs `required`."""
    return _RANK[access_role(role)] >= _RANK[required]


def is_admin_path(path: str) -> bool:
    return path.startswith("/admin/") or path == "/ui" or path.startswith("/ui/")


def is_console_shell(path: str) -> bool:
    """The console's page, scripts and sign-in check: a browser cannot send a bearer token
    when it navigates, and they hold no data (every figure comes from /admin/* with the
    key). /ui/session checks the key itself and answers 200 either way, so that a sign-in
    page is not a console error."""
    return path in ("/ui", "/ui/", "/ui/session") or path.startswith("/ui/static/")
