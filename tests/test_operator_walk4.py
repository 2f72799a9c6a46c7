"""A fourth new operator's walk through the README: the request log and analytics, alerts,
governance (managed keys, roles, versions, audit) and the web console, run as printed. Each
test runs the real CLI (or `edgeroute serve` with the openai SDK as its client) in a
subprocess, or the console in headless Chromium, and asserts what the operator sees."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai

from tests.conftest import eventually
from tests.governance_support import call
from tests.test_operator_walk3 import ONE_MODEL, _cli, _closed_url, _env, _serve, _term, _write

ROOT = "root-token-walk4"
MANAGED = (
    ONE_MODEL
    + f"keys:\n  root: {{token: {ROOT}, role: admin}}\n"
    + "governance: {managed_keys: true, key_poll_interval: 0.25}\n"
)


def _managed(tmp_path: Path) -> Path:
    """A config with managed keys whose one deployment's upstream refuses every connection."""
    return _write(tmp_path, MANAGED.replace("http://127.0.0.1:9/v1", _closed_url()))


def _admin_env(url: str) -> dict[str, str]:
    return _env(EDGEROUTE_URL=url, EDGEROUTE_ADMIN_KEY=ROOT)


def _create(url: str, *flags: str) -> dict[str, Any]:
    r = _cli("keys", "create", *flags, env=_admin_env(url))
    assert r.returncode == 0, r.stderr
    made: dict[str, Any] = json.loads(r.stdout)
    return made


# -- GET /admin/budgets: a managed key's limits ------------------------------------------------------


async def test_budgets_show_a_managed_keys_limits_as_they_are_now(tmp_path: Path) -> None:
    """`keys create --max-parallel 3` then `GET /admin/budgets`: the key's row had no
    `max_parallel` nor `in_flight` (the README says a key's row has both; only config keys'
    had them), and after `keys update --rpm 30` it still said `rpm_limit: 60` until the key's
    next request (the bucket's limit, not the key's)."""
    cfg = _managed(tmp_path)
    proc, url = _serve(cfg)
    try:
        made = _create(url, "--rpm", "60", "--max-parallel", "3")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=made["secret"], max_retries=0)
        try:  # nothing listens upstream: a 502, but the request took from the key's RPM
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 502, e
        finally:
            await client.close()

        async def row() -> dict[str, Any]:
            status, report = await call("GET", url + "/admin/budgets", ROOT)
            assert status == 200, report
            rows = {(r["scope"], r["name"]): r for r in report["rate_limits"]}
            got: dict[str, Any] = rows[("key", made["id"])]
            return got

        first = await row()
        assert (first["rpm_limit"], first["max_parallel"], first["in_flight"]) == (60, 3, 0), first
        assert first["rpm_used"] > 0, first
        r = await asyncio.to_thread(_cli, "keys", "update", made["id"], "--rpm", "30", env=_admin_env(url))
        assert r.returncode == 0, r.stderr

        async def lowered() -> dict[str, Any] | None:
            got = await row()
            return got if got["rpm_limit"] == 30 else None

        assert (await eventually(lowered, "the key's new rpm in /admin/budgets", within=10))["max_parallel"] == 3
    finally:
        _term(proc)


# -- edgeroute logs: a managed key's id -----------------------------------------------------------


async def test_the_logs_table_keeps_its_columns_for_a_managed_key(tmp_path: Path) -> None:
    """A managed key's id (`k` and 12 hex digits) is 13 characters; the key column was 10, so
    every column after it stood three characters right of its header for such a key's rows."""
    cfg = _managed(tmp_path)
    proc, url = _serve(cfg)
    try:
        made = _create(url, "--team", "research")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=made["secret"], max_retries=0)
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 502, e
        finally:
            await client.close()
    finally:
        _term(proc)  # drains and flushes the ledger
    r = _cli("logs", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert row.index(made["id"]) == header.index("key"), r.stdout
    for column, value in (("status", "502"), ("latency_ms", None), ("error_class", "connect_error")):
        at = header.index(column)
        assert row[at - 2 : at] == "  " and row[at] != " ", (column, r.stdout)
        if value is not None:
            assert row[at:].startswith(value), (column, r.stdout)
