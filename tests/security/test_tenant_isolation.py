"""Tenant isolation of the admin API's data: a key bound to a team (an admin or a viewer)
reads its own team's requests, prompts and answers, stats, spend and keys, and nothing of
another team's; a key with no team reads everything. Before, a team-bound admin key listed
and opened every team's requests (prompts and answers included), every team's spend and
stats and every key, read the audit log and the config, and rated another team's answers.

Through the real app, on SQLite and PostgreSQL, with a global admin (the config's root), a
team-A admin, a team-A viewer and a team-B admin. Team names are unique per run, so that a
PostgreSQL database shared with other tests holds no rows of these teams but ours."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually, new_pg_schema_dsn, simple_config
from tests.security.governed import ROOT, call
from tests.test_cost_support import cost_proxy

# Global-only views: they describe or change the whole gateway, and a team's key is refused.
GLOBAL_ONLY = (
    ("GET", "/admin/audit"),
    ("GET", "/admin/config"),
    ("GET", "/admin/config/versions"),
    ("GET", "/admin/alerts"),
    ("GET", "/admin/router/shadow"),
    ("POST", "/admin/reload"),  # an operator's route: the team's admin is refused it still
    ("POST", "/admin/deployments/d-a/drain"),
)


def _ledger(backend: str, tmp_path: Path) -> dict[str, Any]:
    if backend == "postgres":
        return {"backend": "postgres", "dsn": new_pg_schema_dsn(), "flush_interval": 0.05}
    return {"path": str(tmp_path / "log.db"), "flush_interval": 0.05}


async def _chat(url: str, token: str, text: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": text}]
        )
        return str(raw.headers["x-request-id"])
    finally:
        await client.close()


async def _get(s: aiohttp.ClientSession, url: str, token: str) -> tuple[int, Any]:
    return await call(s, "GET", url, token)


async def _pages(s: aiohttp.ClientSession, url: str, token: str, limit: int = 1) -> list[str]:
    """Every id of `/admin/requests?since=1h`, `limit` rows per page through the cursors."""
    ids: list[str] = []
    cursor = ""
    for _ in range(1000):  # a PostgreSQL database shared with other tests holds their requests too
        status, body = await _get(s, f"{url}/admin/requests?since=1h&limit={limit}{cursor}", token)
        assert status == 200, body
        ids += [r["id"] for r in body["data"]]
        if body["next_cursor"] is None:
            return ids
        cursor = "&cursor=" + body["next_cursor"]
    raise AssertionError("more pages than requests")


@dataclass
class Tenants:
    """The proxy, its keys (`made`: name -> the created key, secret included) and the
    requests each team's service key made (`ids`: team -> ids, oldest first)."""

    s: aiohttp.ClientSession
    url: str
    run: str
    team_a: str
    team_b: str
    made: dict[str, dict[str, Any]]
    ids: dict[str, list[str]]

    @property
    def a_admin(self) -> str:
        return str(self.made["a-admin"]["secret"])

    @property
    def a_viewer(self) -> str:
        return str(self.made["a-viewer"]["secret"])

    @property
    def b_admin(self) -> str:
        return str(self.made["b-admin"]["secret"])

    @property
    def a_id(self) -> str:
        return self.ids[self.team_a][0]

    @property
    def b_id(self) -> str:
        return self.ids[self.team_b][0]

    @property
    def ours(self) -> set[str]:
        return {*self.ids[self.team_a], *self.ids[self.team_b]}

    @property
    def newest_first(self) -> dict[str, list[str]]:
        return {team: list(reversed(ids)) for team, ids in self.ids.items()}


@contextlib.asynccontextmanager
async def tenants(start_upstream: Any, tmp_path: Path, backend: str) -> AsyncIterator[Tenants]:
    """Keys of teams A (admin, viewer, service) and B (admin, service) made by the global
    root; five requests, A and B interleaved (so that a page of team A's requests would have
    team B's between them), with their content stored, all in the request log."""
    run = uuid.uuid4().hex[:8]
    team_a, team_b = f"a-{run}", f"b-{run}"
    cfg = simple_config({"a": await start_upstream()}, ledger=_ledger(backend, tmp_path))
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "request_log": {"log_content": "full"},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        url = proxy.url
        made: dict[str, dict[str, Any]] = {}
        for name, role, team in (
            ("a-admin", "admin", team_a),
            ("a-viewer", "viewer", team_a),
            ("a-svc", "service", team_a),
            ("b-admin", "admin", team_b),
            ("b-svc", "service", team_b),
        ):
            status, made[name] = await call(
                s, "POST", url + "/admin/keys", ROOT, {"name": name, "role": role, "team": team}
            )
            assert status == 201, made[name]
        ids: dict[str, list[str]] = {team_a: [], team_b: []}
        for i, (who, team) in enumerate(
            (("a-svc", team_a), ("b-svc", team_b), ("a-svc", team_a), ("b-svc", team_b), ("a-svc", team_a))
        ):
            ids[team].append(await _chat(url, made[who]["secret"], f"private prompt {team} #{i}"))
        ours = set(ids[team_a]) | set(ids[team_b])

        async def all_logged() -> bool:
            status, body = await _get(s, url + "/admin/requests?since=1h&limit=500", ROOT)
            return status == 200 and ours <= {r["id"] for r in body["data"]}

        await eventually(all_logged, "the five requests in the log")
        yield Tenants(s, url, run, team_a, team_b, made, ids)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_team_keys_list_and_open_only_their_teams_requests(
    start_upstream: Any, tmp_path: Path, backend: str
) -> None:
    """Pages (cursors included), one request and its content: a team's own; another team's
    id is the 404 of an unknown one, word for word."""
    async with tenants(start_upstream, tmp_path, backend) as t:
        s, url = t.s, t.url
        assert t.ours <= set(await _pages(s, url, ROOT, limit=500))  # the global admin: everyone's
        assert await _pages(s, url, t.a_admin) == t.newest_first[t.team_a]
        assert await _pages(s, url, t.a_viewer) == t.newest_first[t.team_a]
        assert await _pages(s, url, t.b_admin) == t.newest_first[t.team_b]
        status, body = await _get(s, f"{url}/admin/requests?since=1h&team={t.team_b}", t.a_admin)
        assert (status, body["data"]) == (200, [])  # asking for another team finds nothing
        status, body = await _get(s, f"{url}/admin/requests?since=1h&key={t.made['b-svc']['id']}", t.a_admin)
        assert (status, body["data"]) == (200, [])

        status, mine = await _get(s, f"{url}/admin/requests/{t.a_id}", t.a_admin)
        assert status == 200 and f"private prompt {t.team_a}" in str(mine["content"])
        status, viewed = await _get(s, f"{url}/admin/requests/{t.a_id}", t.a_viewer)
        assert status == 200 and viewed["content"] is None and viewed["content_withheld"] is True
        status, seen = await _get(s, f"{url}/admin/requests/{t.b_id}", ROOT)
        assert status == 200 and f"private prompt {t.team_b}" in str(seen["content"])
        unknown_id = "00000000-0000-0000-0000-" + t.run + "0000"
        for token in (t.a_admin, t.a_viewer):
            status, other = await _get(s, f"{url}/admin/requests/{t.b_id}", token)
            status_u, unknown = await _get(s, f"{url}/admin/requests/{unknown_id}", token)
            assert (status, status_u) == (404, 404), other
            assert t.team_b not in str(other) and "private" not in str(other)
            # Word for word the answer for an id that never was (but the id it names).
            assert other["error"]["message"].replace(t.b_id, "ID") == unknown["error"]["message"].replace(
                unknown_id, "ID"
            )
            assert {k: v for k, v in other["error"].items() if k != "message"} == {
                k: v for k, v in unknown["error"].items() if k != "message"
            }


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_team_keys_get_only_their_teams_stats(start_upstream: Any, tmp_path: Path, backend: str) -> None:
    """Stats: a team's totals alone; a grouping that adds up every team's rows is refused
    (by model, deployment ...: tests/security/test_team_views.py)."""
    async with tenants(start_upstream, tmp_path, backend) as t:
        s, url = t.s, t.url

        async def teams_in_stats() -> dict[str, int]:
            _, body = await _get(s, url + "/admin/stats?since=1h&group_by=team", ROOT)
            got = {r["group"]: r["requests"] for r in body["rows"] if r["group"] in (t.team_a, t.team_b)}
            return got if got == {t.team_a: 3, t.team_b: 2} else {}

        await eventually(teams_in_stats, "both teams in the global admin's stats")
        for token, team, n in ((t.a_admin, t.team_a, 3), (t.a_viewer, t.team_a, 3), (t.b_admin, t.team_b, 2)):
            status, body = await _get(s, url + "/admin/stats?since=1h", token)
            assert status == 200 and body["totals"]["requests"] == n, body
            status, body = await _get(s, url + "/admin/stats?since=1h&group_by=team&bucket=300", token)
            assert status == 200 and {r["group"] for r in body["rows"]} == {team} and body["totals"]["requests"] == n
            status, body = await _get(s, url + "/admin/stats?since=1h&group_by=key", token)
            assert status == 403 and body["error"]["code"] == "permission_denied", body
            assert body["error"]["param"] == "group_by"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_team_keys_get_only_their_teams_spend(start_upstream: Any, tmp_path: Path, backend: str) -> None:
    """Spend, by team and by key: a team's own."""
    async with tenants(start_upstream, tmp_path, backend) as t:
        s, url = t.s, t.url
        status, body = await _get(s, url + "/admin/spend?by=team", ROOT)
        assert status == 200 and {t.team_a, t.team_b} <= {r["team"] for r in body["rows"]}
        for token, team, n, svc in ((t.a_admin, t.team_a, 3, "a-svc"), (t.a_viewer, t.team_a, 3, "a-svc"),
                                    (t.b_admin, t.team_b, 2, "b-svc")):  # fmt: skip
            for by, want in (("team", [team]), ("key", [t.made[svc]["id"]])):
                status, body = await _get(s, f"{url}/admin/spend?by={by}", token)
                assert status == 200 and [r[by] for r in body["rows"]] == want, body
                assert body["total"]["requests"] == n


async def test_team_keys_see_only_their_teams_keys(start_upstream: Any, tmp_path: Path) -> None:
    """Keys: a team's own listed; another team's (or the config's root) unknown to every key route."""
    async with tenants(start_upstream, tmp_path, "sqlite") as t:
        s, url = t.s, t.url
        status, body = await _get(s, url + "/admin/keys", ROOT)
        assert status == 200 and {"root", *(m["id"] for m in t.made.values())} <= {k["id"] for k in body["keys"]}
        status, body = await _get(s, url + "/admin/keys", t.a_admin)
        assert status == 200
        assert sorted(k["id"] for k in body["keys"]) == sorted(
            t.made[n]["id"] for n in ("a-admin", "a-viewer", "a-svc")
        )
        b_key = t.made["b-svc"]["id"]
        for method, path, payload in (
            ("GET", f"/admin/keys/{b_key}", None),
            ("GET", "/admin/keys/root", None),
            ("PATCH", f"/admin/keys/{b_key}", {"rpm": 1}),
            ("DELETE", f"/admin/keys/{b_key}", None),
            ("POST", f"/admin/keys/{b_key}/rotate", {}),
        ):
            status, body = await call(s, method, url + path, t.a_admin, payload)
            assert (status, body["error"]["code"]) == (404, "key_not_found"), (method, path, body)
        status, body = await _get(s, f"{url}/admin/keys/{b_key}", ROOT)
        assert status == 200 and body["status"] == "active" and body.get("rpm") is None  # untouched


async def test_team_keys_are_refused_global_views(start_upstream: Any, tmp_path: Path) -> None:
    """Views of the whole gateway: a 403 in the API's format for a team's key, served to the global one."""
    async with tenants(start_upstream, tmp_path, "sqlite") as t:
        s, url = t.s, t.url
        for method, path in GLOBAL_ONLY:
            for token in (t.a_admin, t.a_viewer) if method == "GET" else (t.a_admin,):
                status, body = await call(s, method, url + path, token)
                assert status == 403 and body["error"]["code"] == "permission_denied", (path, body)
                assert "not bound to a team" in body["error"]["message"]
        status, body = await _get(s, url + "/admin/audit", ROOT)
        assert status == 200 and body["entries"]
        async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {t.a_admin}"}) as r:
            assert r.status == 403, await r.text()
        async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {ROOT}"}) as r:
            assert r.status == 200


async def test_the_console_offers_a_team_key_only_its_routes(start_upstream: Any, tmp_path: Path) -> None:
    """The console's session lists the routes the key may call."""
    async with tenants(start_upstream, tmp_path, "sqlite") as t:
        s, url = t.s, t.url
        async with s.get(url + "/ui/session", headers={"Authorization": f"Bearer {t.a_viewer}"}) as r:
            session = await r.json()
        assert session["signed_in"] and session["team"] == t.team_a
        assert "GET /admin/requests" in session["routes"] and "GET /admin/spend" in session["routes"]
        assert "GET /admin/audit" not in session["routes"] and "GET /admin/config" not in session["routes"]


async def test_team_admins_rate_only_their_teams_answers(start_upstream: Any, tmp_path: Path) -> None:
    """Feedback by an admin key: its own team's requests, not another team's."""
    async with tenants(start_upstream, tmp_path, "sqlite") as t:
        s, url = t.s, t.url
        for token, rid, want in ((t.a_admin, t.b_id, 404), (t.a_admin, t.a_id, 200), (ROOT, t.b_id, 200)):
            status, body = await call(s, "POST", url + "/v1/feedback", token, {"request_id": rid, "score": 1})
            assert status == want, body
            if want == 404:
                assert body["error"]["code"] == "unknown_request_id"
