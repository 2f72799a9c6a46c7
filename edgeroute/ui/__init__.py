"""The web console at `/ui`: static pages served by the proxy itself, no separate server.

The console is a single page (`index.html` and the ES modules under `static/`) that reads
every figure from the `/admin/*` API with the operator's key, sent as a bearer token from
the browser's session storage. The page shell holds no data and a browser cannot send a
bearer token when it navigates, so the shell is served without a key (see
:func:`roles.is_console_shell`); `GET /ui/session` is where the console learns whether its key is
good and which role it has. Every response carries a strict Content-Security-Policy (no
inline script, nothing from another origin), no framing and no referrer.
"""

from __future__ import annotations

import time
from importlib import resources
from importlib.resources.abc import Traversable

import orjson
from aiohttp import web

from edgeroute import roles
from edgeroute.cost.keys import MANAGED_KEYS, Identity, bearer_token
from edgeroute.errors import ProxyError
from edgeroute.state import STATE

STATIC = resources.files(__package__) / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

NO_STORE = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


def _asset(name: str) -> Traversable | None:
    """A file under static/, by a plain relative name (no `..`, no hidden files)."""
    parts = name.split("/")
    if not name or any(not p or p.startswith(".") for p in parts):
        return None
    node = STATIC
    for p in parts:
        node = node / p
    return node if node.is_file() and any(name.endswith(ext) for ext in _TYPES) else None


def _file_response(node: Traversable, name: str, cache: str) -> web.Response:
    ctype = next(t for ext, t in _TYPES.items() if name.endswith(ext))
    headers = {**SECURITY_HEADERS, "Content-Type": ctype, "Cache-Control": cache}
    return web.Response(body=node.read_bytes(), headers=headers)


async def ui_root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/", headers=SECURITY_HEADERS)


async def ui_index(request: web.Request) -> web.Response:
    node = _asset("index.html")
    assert node is not None, "the console's index.html ships in the package"
    return _file_response(node, "index.html", "no-cache")


async def ui_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    node = _asset(name)
    if node is None:
        raise web.HTTPNotFound()
    # Revalidated on each load: a new release must not run against a stale script.
    return _file_response(node, name, "no-cache")


async def _signed_in(request: web.Request) -> tuple[bool, dict[str, object]]:
    """Whether the request's key may use the console, and who it is."""
    access = request.app[STATE].live.access
    token = bearer_token(request)
    if access.keyed(request):
        try:  # judged as the admin routes judge it: the config's keys, then managed ones
            ident = await _key_of(request, token)
        except ProxyError:  # revoked or expired: refused like an unknown key, still a 200
            ident = None
        if ident is None:
            return False, {"reason": "invalid_key" if token else "key_required"}
        if not roles.permits(ident.role, "viewer"):
            return False, {"reason": "role", "message": "The console needs a key with role viewer, operator or admin."}
        return True, {"auth": "key", "key": ident.key, "role": roles.access_role(ident.role), "team": ident.team}
    if access.shared:
        if not access.is_shared(token):
            return False, {"reason": "invalid_key" if token else "key_required"}
        return True, {"auth": "shared", "key": None, "role": "admin"}  # shared keys reach every admin route
    return True, {"auth": "loopback", "key": None, "role": "admin"}


async def _key_of(request: web.Request, token: str | None) -> Identity | None:
    """The console's key, as `Access.key_of` finds it; a well-formed managed key this instance
    has not read yet (made on another instance a moment ago) once the key store has been read
    after this request came in, as the admin routes wait for it (bounded: `MISS_WAIT_S`).
    Without it, a key made on one instance could not sign in to another's console until that
    instance's next poll."""
    since = time.monotonic()
    ident = request.app[STATE].live.access.key_of(request)
    managed = request.app.get(MANAGED_KEYS)
    if ident is None and token and managed is not None and managed.may_be_new(token):
        ident = await managed.identify_after_read(token, since)
    return ident


async def ui_session(request: web.Request) -> web.Response:
    """Who the console's key is, and the admin routes it may call (so that the console
    shows a feature this server lacks as such without calling it). Always 200: a sign-in
    page must not be an error in the browser's console."""
    ok, body = await _signed_in(request)
    if ok:
        role = str(body["role"])
        routes, withheld = set(), set()
        for route in request.app.router.routes():
            path = route.resource.canonical if route.resource is not None else ""
            needed = roles.required_role(route.method, path)
            if path.startswith("/admin/") and needed is not None and roles.permits(role, needed):
                if body.get("team") is None or roles.team_may(route.method, path):  # a team's key: its routes
                    routes.add(f"{route.method} {path}")
                else:  # the server has it, but it covers every team: the console says so, not "not available"
                    withheld.add(f"{route.method} {path}")
        body["routes"] = sorted(routes)
        if body.get("team") is not None:
            body["every_team"] = sorted(withheld)
    body["signed_in"] = ok
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=NO_STORE)


def install(app: web.Application) -> None:
    app.router.add_get("/ui", ui_root)
    app.router.add_get("/ui/", ui_index)
    app.router.add_get("/ui/session", ui_session)
    app.router.add_get("/ui/static/{name:.+}", ui_static)
