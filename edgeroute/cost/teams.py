"""Which team an admin view is about: the caller's own, or the one a `team=` parameter names.

A key bound to a team reads its own team's data (`cost.keys.tenant_of`); naming another
team gets the 404 of a team that does not exist, word for word, so that a team's key cannot
tell another team's name from a name nobody uses. A key bound to no team may name any team
the gateway knows: one a config key or a managed key (revoked ones too) belongs to, or a
team budget names. This module owns that list and that answer, for `/admin/budgets` and
`/admin/stats`.
"""

from __future__ import annotations

from aiohttp import web

from edgeroute.cost.keys import MANAGED_KEYS, tenant_of
from edgeroute.errors import ProxyError
from edgeroute.state import STATE


def known_teams(app: web.Application) -> set[str]:
    """Every team the running config and the managed keys name."""
    cfg = app[STATE].live.config
    out = {k.team for k in cfg.keys.values() if k.team}
    out |= {b.match for b in cfg.budgets.limits if b.scope == "team" and b.match}
    managed = app.get(MANAGED_KEYS)
    if managed is not None:
        out |= managed.teams()
    return out


def no_such_team(team: str) -> ProxyError:
    return ProxyError(404, f"No team {team!r} is known to this gateway.", code="team_not_found", param="team")


def team_in_view(request: web.Request) -> str | None:
    """The team the answer is confined to (None: every team), or a 404 for a `team=` that
    is not one (another team's, for a team-bound caller). A team-bound caller's own team is
    always known: its key names it."""
    tenant = tenant_of(request)
    asked = request.query.get("team")
    if asked is None:
        return tenant
    if tenant is not None:
        if asked != tenant:
            raise no_such_team(asked)
        return tenant
    if asked not in known_teams(request.app):
        raise no_such_team(asked)
    return asked
