"""`GET /admin/requests`, `GET /admin/requests/{id}` and `GET /admin/stats`.

Viewer routes (see `roles.py`); a request's prompt and answer, where stored, are returned
to admin keys only (and, without keys, to the loopback clients that may call admin routes
at all). A key bound to a team reads its team's requests and stats alone (`tenant_of`): the
team is a condition of every query, and another team's request id is a 404 like an unknown one.
`/admin/stats?team=` confines the stats to one team (`cost.teams.team_in_view`: a team the
gateway does not know, or another team than a team-bound caller's own, is a 404).
The queries run on the query pool (`gate`): a page or a day of stats never stalls the proxy,
and a viewer's slow queries are bounded in number and time and never wait in front of the
request path's or the key store's threads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from edgeroute import roles
from edgeroute.cost.keys import IDENTITY, tenant_of
from edgeroute.cost.ledger_store import Backend
from edgeroute.cost.teams import no_such_team, team_in_view
from edgeroute.errors import ProxyError
from edgeroute.requestlog import gate, query

REQUEST_LOG = web.AppKey("request_log_db", Backend)


def _db(request: web.Request) -> Backend:
    db = request.app.get(REQUEST_LOG)
    if db is None:
        raise ProxyError(
            404,
            "The request log is off: it needs a ledger (SQLite or PostgreSQL) and `request_log.enabled`.",
            code="no_request_log",
        )
    return db


def _json(body: object) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _answer(
    request: web.Request, run: Callable[[query.Readable, Mapping[str, str], float | None, str | None], dict[str, Any]]
) -> web.Response:
    db = _db(request)
    try:
        q, tenant = request.query, tenant_of(request)
        body = await gate.run(request, lambda bounded: run(bounded, q, None, tenant), db)
    except query.BadParam as e:
        raise ProxyError(400, f"Invalid parameter {e}", code="invalid_parameter", param=e.param) from None
    except query.TeamScope as e:
        raise ProxyError(403, f"{e}.", code="permission_denied", param="group_by") from None
    except query.OtherTeam as e:
        raise no_such_team(str(e)) from None
    return _json(body)


async def admin_requests(request: web.Request) -> web.Response:
    return await _answer(request, query.list_requests)


def may_read_content(request: web.Request) -> bool:
    ident = request.get(IDENTITY)
    return ident is None or roles.permits(ident.role, "admin")


async def admin_request(request: web.Request) -> web.Response:
    db = _db(request)
    rid = request.match_info["id"]
    if len(rid) > 256 or "\x00" in rid:  # PostgreSQL refuses NUL in text: a 500, not a 404
        raise ProxyError(
            400, "Invalid parameter id: longer than 256 characters or with a NUL", code="invalid_parameter", param="id"
        )
    content, tenant = may_read_content(request), tenant_of(request)
    found = await gate.run(request, lambda bounded: query.get_request(bounded, rid, content, tenant), db)
    if found is None:
        raise ProxyError(404, f"No request {rid!r} in the request log.", code="request_not_found")
    return _json(found)


async def admin_stats(request: web.Request) -> web.Response:
    team_in_view(request)  # a team that is not one is a 404 before anything is read
    return await _answer(request, query.stats)


def install(app: web.Application, db: Backend | None) -> None:
    """Adds the routes; `db` is the ledger's backend when the request log is on."""
    if db is not None:
        app[REQUEST_LOG] = db
    gate.install(app)  # the spend report's queries pass it too, with or without a request log
    app.router.add_get("/admin/requests", admin_requests)
    app.router.add_get("/admin/requests/{id}", admin_request)
    app.router.add_get("/admin/stats", admin_stats)
