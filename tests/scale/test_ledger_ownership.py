"""Two `edgeroute serve` processes on one SQLite ledger, and a ledger that cannot be opened.

Without `shared_state` a server counts budgets in its own memory. Two servers started on the
same config directory (so the same `edgeroute-ledger.db`) each admitted the whole budget: a
$0.10 day budget let 20 one-cent requests through. The second is now refused at start with
an error naming the ledger, and a server killed with SIGKILL leaves no lock behind. With
`shared_state` (budgets in Redis) two servers may still share one SQLite ledger.
Real servers, $0.01 a request, each test within a few seconds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scale.support import REDIS_URL, Instance, Spawn, kill_tree
from tests.serve_support import free_port
from tests.test_cost_restart import CENT
from tests.test_cost_support import answered, require_postgres

TEN_CENTS_A_DAY = {"limits": [{"name": "ten", "scope": "global", "limit_usd": 0.10, "period": "day"}]}


def config_with_a_budget(upstream: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": upstream}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini", "price": CENT}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"flush_interval": 0.1},  # the embedded default: edgeroute-ledger.db beside the config
        "budgets": TEN_CENTS_A_DAY,
    }
    cfg.update(extra)
    return cfg


def serve_until_stopped(config: Path, *flags: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`edgeroute serve` expected to stop by itself (refused); killed by PID if it serves instead."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeroute", "serve", "--config", str(config), "--port", str(free_port()), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"the server did not stop by itself:\n{out[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


async def test_a_second_server_on_the_same_sqlite_ledger_is_refused_and_the_budget_holds(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    first = await spawn(config_with_a_budget(up.base_url), name="cfg")
    second = await asyncio.to_thread(serve_until_stopped, first.config)
    assert second.returncode == 1, second.stdout
    out = second.stdout
    assert "Traceback" not in out
    assert str(tmp_path / "edgeroute-ledger.db") in out and "shared_state" in out, out
    assert f"pid {first.proc.pid}" in out, out
    # So the ten cents stay ten requests, all of them through the one server.
    assert await answered(first.url, 15) == 10
    # `serve --workers 2` on that ledger is refused the same way.
    workers = await asyncio.to_thread(serve_until_stopped, first.config, "--workers", "2")
    assert workers.returncode == 1 and "shared_state" in workers.stdout, workers.stdout


async def test_a_server_killed_hard_leaves_the_ledger_to_the_next(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = config_with_a_budget(up.base_url)
    first = await spawn(cfg, "--workers", "2", name="cfg")
    assert await answered(first.url, 6) == 6
    await asyncio.sleep(0.4)  # past the flush interval: the six cents are in the ledger
    alone = await asyncio.to_thread(serve_until_stopped, first.config)  # the supervisor holds it for its workers
    assert alone.returncode == 1 and "shared_state" in alone.stdout, alone.stdout
    kill_tree(first.proc.pid)
    await first.proc.wait()
    second = await spawn(cfg, name="cfg")
    assert await answered(second.url, 10) == 4


async def test_two_servers_on_one_postgres_ledger_without_redis_are_refused_too(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = config_with_a_budget(up.base_url, ledger={"backend": "postgres", "dsn": pg_schema_dsn, "flush_interval": 0.1})
    first = await spawn(cfg, name="pg")
    other = tmp_path / "other" / "pg.yaml"  # another directory: only the database is shared
    other.parent.mkdir()
    other.write_text(yaml.safe_dump(cfg))
    second = await asyncio.to_thread(serve_until_stopped, other)
    assert second.returncode == 1 and "PostgreSQL" in second.stdout and "shared_state" in second.stdout, second.stdout
    kill_tree(first.proc.pid)
    await first.proc.wait()
    third = await spawn(cfg, name="pg")  # the lock went with the killed server's connection
    assert third.proc.returncode is None


async def test_two_servers_with_ledgers_in_two_schemas_of_one_database_both_serve(
    spawn: Spawn, start_upstream: Any, tmp_path: Path
) -> None:
    # Two gateways (two teams' sidecars) given one database and a schema each: two ledgers. The
    # lock was the database's, so the second was refused as "another edgeroute serve".
    import psycopg

    dsn = require_postgres()
    schemas = [f"own_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with psycopg.connect(dsn, autocommit=True) as c:
        for schema in schemas:
            c.execute(f"CREATE SCHEMA {schema}")
    servers: list[Instance] = []
    try:
        up = await start_upstream()
        for i, schema in enumerate(schemas):
            ledger = {"backend": "postgres", "dsn": f"{dsn}?options=-csearch_path%3D{schema}", "flush_interval": 0.1}
            servers.append(await spawn(config_with_a_budget(up.base_url, ledger=ledger), name=f"pg{i}"))
        # Each counts its own ten cents.
        assert [await answered(s.url, 12) for s in servers] == [10, 10]
        # The same schema twice is still one ledger held twice.
        other = tmp_path / "other" / "pg.yaml"
        other.parent.mkdir()
        other.write_text(servers[0].config.read_text())
        second = await asyncio.to_thread(serve_until_stopped, other)
        assert second.returncode == 1 and "PostgreSQL" in second.stdout, second.stdout
    finally:
        for server in servers:  # before the schemas go: their connections hold the tables
            kill_tree(server.proc.pid)
            await server.proc.wait()
        with psycopg.connect(dsn, autocommit=True) as c:
            for schema in schemas:
                c.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_servers_sharing_budgets_through_redis_may_share_a_sqlite_ledger(
    spawn: Spawn, start_upstream: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    up = await start_upstream()
    prefix = f"t-{request.node.name[:40]}-{id(tmp_path)}"
    cfg = config_with_a_budget(up.base_url, shared_state={"redis_url": REDIS_URL, "prefix": prefix})
    a = await spawn(cfg, name="cfg")
    b = await spawn(cfg, name="cfg")
    got = await asyncio.gather(answered(a.url, 8), answered(b.url, 8))
    assert sum(got) == 10, got
    # A server without shared_state cannot join them: it would count alone.
    alone = tmp_path / "alone.yaml"
    alone.write_text(yaml.safe_dump(config_with_a_budget(up.base_url)))
    refused = await asyncio.to_thread(serve_until_stopped, alone)
    assert refused.returncode == 1 and "shared_state" in refused.stdout, refused.stdout
    for inst in (a, b):
        kill_tree(inst.proc.pid)
