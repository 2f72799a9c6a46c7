"""A team's key cannot make a key for another team's user.

A team's admin key (team alpha, no user of its own) could `POST /admin/keys {"user": "carol"}`
where carol is beta's user, held to a `scope: user` budget: the alpha key then spent carol's
budget (beta's own key got 429 `budget_exceeded`) and was routed by rules for her. A team's
key now names only its own team's users: a user another team's key names, or a user budget
holds while no key of the team names it, is a 403.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import simple_config
from tests.security.governed import ROOT, USER, call
from tests.test_cost_support import cost_proxy

ALPHA, CAROL = "tok-alpha-admin-0123456789", "tok-carol-beta-0123456789"


def _config(up: Any, tmp_path: Path) -> dict[str, Any]:
    """Alpha's admin key, beta's user carol (and her budget), and a budget for dave, of no key."""
    cfg = simple_config({"a": up})
    cfg |= {
        "keys": {
            "root": {"token": ROOT, "role": "admin"},
            "adminA": {"token": ALPHA, "role": "admin", "team": "alpha"},
            "carolB": {"token": CAROL, "role": "service", "team": "beta", "user": "carol"},
        },
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05},
        "budgets": {
            "limits": [
                {"name": "carol-monthly", "scope": "user", "match": "carol", "limit_usd": 5},
                {"name": "dave-monthly", "scope": "user", "match": "dave", "limit_usd": 5},
            ]
        },
    }
    return cfg


async def test_a_teams_key_names_only_its_own_teams_users(start_upstream: Any, tmp_path: Path) -> None:
    cfg = _config(await start_upstream(), tmp_path)
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        for user in ("carol", "dave"):  # beta's user; a user a budget holds, of no alpha key
            status, err = await call(s, "POST", keys, ALPHA, {"name": "svc", "role": "service", "user": user})
            assert status == 403, err
            assert err["error"]["code"] == "permission_denied" and err["error"]["param"] == "user", err
            assert err["error"]["message"] == (
                f"User '{user}' is not one of team 'alpha''s users: a team's key may name only its own team's users."
            )
        # A user of its own (no other team's, no budget's) is alpha's to name; not renamed to carol.
        status, alan = await call(s, "POST", keys, ALPHA, {"name": "alan", "role": "service", "user": "alan"})
        assert status == 201 and alan["user"] == "alan" and alan["team"] == "alpha", alan
        status, err = await call(s, "PATCH", keys + f"/{alan['id']}", ALPHA, {"user": "carol"})
        assert status == 403, err
        # The root (no team) still gives any user; beta's own key is untouched.
        status, other = await call(s, "POST", keys, ROOT, {"name": "c2", "role": "service", "user": "carol"})
        assert status == 201 and other["user"] == "carol"
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=CAROL, max_retries=0)
        await client.chat.completions.create(model="m", messages=USER, max_tokens=5)
        await client.close()


async def test_a_look_alike_of_another_teams_user_is_refused(start_upstream: Any, tmp_path: Path) -> None:
    """`Carol`, ` carol`, `carol` with a zero-width space, `carol` in full-width letters: accepted, each
    passed in spend by user as beta's carol (and `Dave` as the budgeted dave)."""
    async with cost_proxy(_config(await start_upstream(), tmp_path)) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        for user in ("Carol", " carol", "carol\u200b", "\uff43\uff41\uff52\uff4f\uff4c", "DAVE "):
            status, err = await call(s, "POST", keys, ALPHA, {"name": "svc", "role": "service", "user": user})
            assert status == 403, (user, err)
            assert err["error"]["code"] == "permission_denied" and err["error"]["param"] == "user", err
        status, alan = await call(s, "POST", keys, ALPHA, {"name": "alan", "role": "service", "user": "alan"})
        assert status == 201, alan
        status, err = await call(s, "PATCH", keys + f"/{alan['id']}", ALPHA, {"user": "CAROL"})
        assert status == 403, err
        # A global admin still names anyone, look-alikes included.
        status, other = await call(s, "POST", keys, ROOT, {"name": "c3", "role": "service", "user": "Carol"})
        assert status == 201 and other["user"] == "Carol", other


async def test_marks_and_mixed_scripts_do_not_make_another_user(start_upstream: Any, tmp_path: Path) -> None:
    """`carol` with a combining grapheme joiner or a variation selector passed as a new user (and
    read as carol in spend by user); `c\u0430rol` with a Cyrillic a, or a Greek omicron, likewise. The first
    are carol's look-alikes (403); a name mixing those scripts is refused for anyone (400)."""
    async with cost_proxy(_config(await start_upstream(), tmp_path)) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        for user in ("carol\u034f", "carol\ufe0f"):
            status, err = await call(s, "POST", keys, ALPHA, {"name": "svc", "role": "service", "user": user})
            assert status == 403 and err["error"]["code"] == "permission_denied", (user, err)
        for token in (ALPHA, ROOT):
            for user in ("c\u0430rol", "car\u03bfl", "\u0392ob"):
                status, err = await call(s, "POST", keys, token, {"name": "svc", "role": "service", "user": user})
                assert status == 400 and err["error"]["param"] == "user", (user, err)
                assert "mixes letters of Latin, Greek or Cyrillic" in err["error"]["message"]
        # One script is a name like any other, whatever the script.
        status, key = await call(
            s, "POST", keys, ALPHA, {"name": "svc", "role": "service", "user": "\u0431\u043e\u0440\u0438\u0441"}
        )
        assert status == 201, key


async def test_a_global_admin_is_told_when_another_team_names_the_user(start_upstream: Any, tmp_path: Path) -> None:
    """A team that named a user first (squatting, or a mistake) shared that user's budget with
    the team a global admin later put the user in: the 201 said nothing. Now a 409 names the team."""
    async with cost_proxy(_config(await start_upstream(), tmp_path)) as proxy, aiohttp.ClientSession() as s:
        keys = proxy.url + "/admin/keys"
        status, err = await call(
            s, "POST", keys, ROOT, {"name": "c", "role": "service", "team": "gamma", "user": "Carol"}
        )
        assert status == 409 and err["error"]["code"] == "user_conflict", err
        assert "named by keys of 'beta'" in err["error"]["message"]
        status, key = await call(
            s, "POST", keys, ROOT, {"name": "c", "role": "service", "team": "beta", "user": "carol"}
        )
        assert status == 201 and key["team"] == "beta", key
