"""A team's cap of live keys holds under concurrent creations, on one instance and across several.

`governance.max_keys_per_team` was checked against this instance's view of the keys before the
write: creations sent at once all passed the check (none read back yet), and instances sharing a
PostgreSQL store each counted only what they had read. The write now counts the team's live keys
in its own transaction, one capped write at a time on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.conftest import eventually, simple_config
from tests.governance_support import call
from tests.test_cost_support import cost_proxy

ADMIN = "tok-admin-0123456789"
CAP = 3


def _cfg(up: Any, ledger: dict[str, Any]) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "max_keys_per_team": CAP, "max_keys_without_team": CAP}
    cfg["ledger"] = ledger
    return cfg


@contextlib.asynccontextmanager
async def _proxy(cfg: dict[str, Any]) -> AsyncIterator[str]:
    async with cost_proxy(cfg) as p:  # the app from the config, served as `edgeroute serve` does
        yield p.url


async def _create_at_once(urls: list[str], n: int, fields: dict[str, Any]) -> list[int]:
    answers = await asyncio.gather(
        *(call("POST", urls[i % len(urls)] + "/admin/keys", ADMIN, json=fields) for i in range(n))
    )
    for status, body in answers:
        assert status == 201 or body["error"]["code"] == "key_limit_reached", body
    return sorted(status for status, _ in answers)


async def _live(url: str, team: str | None) -> int:
    status, body = await call("GET", url + "/admin/keys", ADMIN)
    assert status == 200, body
    return sum(1 for k in body["keys"] if k.get("source") == "managed" and k["team"] == team)


async def test_creations_at_once_stay_within_the_teams_cap(start_upstream: Any, tmp_path: Path) -> None:
    cfg = _cfg(await start_upstream(), {"path": str(tmp_path / "gov.db")})
    async with _proxy(cfg) as url:
        assert await _create_at_once([url], 10, {"team": "alpha"}) == [201] * CAP + [409] * 7
        assert await _create_at_once([url], 10, {}) == [201] * CAP + [409] * 7  # keys of no team
        assert await _live(url, "alpha") == CAP and await _live(url, None) == CAP


async def test_two_instances_on_postgres_share_the_teams_cap(start_upstream: Any, pg_schema_dsn: str) -> None:
    cfg = _cfg(await start_upstream(), {"backend": "postgres", "dsn": pg_schema_dsn})
    async with _proxy(cfg) as a, _proxy(cfg) as b:
        assert await _create_at_once([a, b], 10, {"team": "alpha"}) == [201] * CAP + [409] * 7
        # A revoked key makes room again, on either instance.
        status, body = await call("GET", a + "/admin/keys", ADMIN)
        assert status == 200, body
        first = next(k for k in body["keys"] if k.get("source") == "managed")
        assert (await call("DELETE", a + f"/admin/keys/{first['id']}", ADMIN))[0] == 200
        assert await _create_at_once([a, b], 4, {"team": "alpha"}) == [201, 409, 409, 409]


async def test_expired_keys_given_a_new_expiry_stay_within_the_teams_cap(start_upstream: Any, tmp_path: Path) -> None:
    """red8 G2: an expired key given a later `expires_at` is live again: past the cap, that is
    the 409 a creation gets (the cap was checked on creations and moves alone: keys made
    short-lived, let expire, made again and then all extended were 3 times the cap)."""
    cfg = _cfg(await start_upstream(), {"path": str(tmp_path / "gov.db")})
    cfg["governance"]["key_poll_interval"] = 0.1
    async with _proxy(cfg) as url:
        short = []
        for _ in range(CAP):
            status, made = await call(
                "POST", url + "/admin/keys", ADMIN, json={"team": "t1", "expires_at": time.time() + 1}
            )
            assert status == 201, made
            short.append(made["id"])

        async def expired() -> bool:
            _, body = await call("GET", url + "/admin/keys", ADMIN)
            return all(k["status"] == "expired" for k in body["keys"] if k.get("id") in short)

        await eventually(expired, "the short-lived keys expired")

        async def made() -> bool:  # 409 until this instance's poll has seen them expire
            return (await call("POST", url + "/admin/keys", ADMIN, json={"team": "t1"}))[0] == 201

        await eventually(made, "a key made once the others expired")
        assert await _create_at_once([url], CAP - 2, {"team": "t1"}) == [201] * (CAP - 2)  # room for one more
        later = {"expires_at": time.time() + 3600}
        answers = await asyncio.gather(*(call("PATCH", url + f"/admin/keys/{k}", ADMIN, json=later) for k in short))
        assert sorted(status for status, _ in answers) == [200, 409, 409], answers
        refused = next(body for status, body in answers if status == 409)
        assert refused["error"]["code"] == "key_limit_reached" and "max_keys_per_team" in refused["error"]["message"]
        status, body = await call("GET", url + "/admin/keys", ADMIN)
        assert sum(1 for k in body["keys"] if k.get("team") == "t1" and k["status"] == "active") == CAP, body
        # A live key's expiry moved, in a full team, is no new key: never refused.
        revived = next(k for k, (status, _) in zip(short, answers, strict=True) if status == 200)
        again = await call("PATCH", url + f"/admin/keys/{revived}", ADMIN, json={"expires_at": time.time() + 7200})
        assert again[0] == 200, again
