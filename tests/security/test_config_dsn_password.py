"""A PostgreSQL ledger DSN written in libpq's keyword form (`host=db user=er password=...`)
holds its password without an `@`. Config views mask a `dsn` only when it carries
credentials, which they read as `user:password@`: this one was shown as written to every
viewer key (`/admin/config`, a version, a diff) and stored in clear in the config versions
table, where every other literal secret is stored as its hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.security.governed import ROOT, call, config_views
from tests.test_cost_support import cost_proxy

VIEWER = "tok-viewer-0123456789"


def _keyword_form(dsn: str) -> tuple[str, str]:
    """`dsn` in libpq's keyword form, and its password."""
    parts = conninfo_to_dict(dsn)
    return make_conninfo(**parts), str(parts["password"])


async def test_a_keyword_dsn_password_is_masked_and_stored_as_a_hash(tmp_path: Path, pg_schema_dsn: str) -> None:
    dsn, password = _keyword_form(pg_schema_dsn)
    assert "@" not in dsn and password in dsn
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-unused-0123456789"}},
        "deployments": {"d": {"provider": "a", "model": "x"}, "e": {"provider": "a", "model": "y"}},
        "models": {"m": {"deployments": ["d", "e"]}},
        "keys": {"root": {"token": ROOT, "role": "admin"}, "viewer": {"token": VIEWER, "role": "viewer"}},
        "ledger": {"backend": "postgres", "dsn": dsn},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, drained = await call(s, "POST", proxy.url + "/admin/deployments/e/drain", ROOT)
        assert status == 200, drained  # version 2
        for path, text in (await config_views(s, proxy.url, VIEWER)).items():
            assert password not in text, (path, text)
        status, shown = await call(s, "GET", proxy.url + "/admin/config", VIEWER)
        assert shown["config"]["ledger"]["dsn"] == "****"
    with psycopg.connect(pg_schema_dsn) as db:
        stored = [row for (row,) in db.execute("SELECT body FROM gov_config_versions")]
    assert stored and not [text for text in stored if password in text]
