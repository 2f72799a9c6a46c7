"""Config versions, diff, check, rollback and the audit log, through the admin API."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from aiohttp.test_utils import TestServer

from edgeroute import config as config_mod
from edgeroute.governance.store import GovStore
from edgeroute.server import create_app
from tests.conftest import eventually, patience, simple_config
from tests.governance_support import call, write_config


@pytest.fixture
async def served(start_upstream, tmp_path: Path):  # type: ignore[no-untyped-def]
    up = await start_upstream()
    secret = tmp_path / "provider-key"
    secret.write_text("sk-first\n")
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["api_key"] = f"file:{secret}"
    cfg["providers"]["a"]["headers"] = {"x-team-secret": "literal-header-value"}
    cfg["keys"] = {
        "root": {"token": "tok-admin", "role": "admin"},
        "ops": {"token": "tok-operator", "role": "operator"},
        "look": {"token": "tok-viewer", "role": "viewer"},
    }
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", path, cfg, secret
    finally:
        await server.close()


async def test_versions_diff_rollback_and_audit(served) -> None:  # type: ignore[no-untyped-def]
    url, path, cfg, _ = served
    status, body = await call("GET", url + "/admin/config", "tok-viewer")
    assert status == 200 and body["version"] == 1
    text = str(body)
    assert "literal-header-value" not in text and "tok-admin" not in text
    assert body["config"]["keys"]["root"]["token"] == "****"
    assert body["config"]["providers"]["a"]["api_key"].startswith("file:")  # references are shown

    cfg["models"]["m2"] = {"deployments": ["d-a"]}
    write_config(path, cfg)
    status, _ = await call("POST", url + "/admin/reload", "tok-operator")
    assert status == 200
    status, body = await call("GET", url + "/admin/config/versions", "tok-viewer")
    assert status == 200
    versions = body["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["active"] and not versions[1]["active"]
    assert versions[0]["source"] == "reload" and versions[0]["applied_by"] == "ops"
    assert len(versions[0]["hash"]) == 64

    status, body = await call("GET", url + "/admin/config/diff?from=1&to=2", "tok-viewer")
    assert status == 200
    assert "+  m2:" in body["diff"] and "literal-header-value" not in body["diff"]

    status, body = await call("GET", url + "/admin/config/versions/1", "tok-viewer")
    assert status == 200 and "m2" not in body["config"]["models"]

    # A viewer cannot roll back; an operator can.
    status, _ = await call("POST", url + "/admin/config/rollback", "tok-viewer", json={"version": 1})
    assert status == 403
    status, body = await call("POST", url + "/admin/config/rollback", "tok-operator", json={"version": 1})
    assert status == 200, body
    assert body["rolled_back_to"] == 1 and body["version"] == 3 and body["file_updated"] is True
    assert "m2" not in yaml.safe_load(path.read_text())["models"]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-viewer")
    try:
        assert [m.id for m in (await client.models.list()).data] == ["m"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()

    status, body = await call("GET", url + "/admin/audit?action=config", "tok-viewer")
    assert status == 200
    actions = [(e["action"], e["actor"]) for e in body["entries"]]
    assert actions[:2] == [("config.rollback", "ops"), ("config.reload", "ops")]
    assert body["entries"][0]["before"] == {"version": 2}
    assert body["entries"][0]["after"] == {
        "version": 3,
        "hash": body["entries"][0]["after"]["hash"],
        "source": "rollback:1",
    }
    status, body = await call("GET", url + "/admin/audit?actor=nobody", "tok-viewer")
    assert status == 200 and body["entries"] == []


async def test_rollback_to_a_version_that_no_longer_validates(served) -> None:  # type: ignore[no-untyped-def]
    url, path, cfg, secret = served
    cfg["providers"]["a"]["api_key"] = "sk-literal"
    write_config(path, cfg)
    assert (await call("POST", url + "/admin/reload", "tok-admin"))[0] == 200
    secret.unlink()  # version 1's provider key is gone
    status, body = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": 1})
    assert status == 409, body
    assert body["error"]["code"] == "rollback_refused"
    assert "No such file or directory" in str(body["error"]["problems"])
    status, body = await call("GET", url + "/admin/config", "tok-admin")
    assert body["version"] == 2  # nothing changed
    assert yaml.safe_load(path.read_text())["providers"]["a"]["api_key"] == "sk-literal"


@pytest.mark.parametrize(
    ("method", "path", "payload", "status"),
    [
        ("POST", "/admin/config/rollback", {"version": "1"}, 400),
        ("POST", "/admin/config/rollback", {"version": 99}, 404),
        ("POST", "/admin/config/rollback", {"version": 1, "force": True}, 400),
        ("POST", "/admin/config/rollback", [1], 400),
        ("GET", "/admin/config/diff?to=1", None, 400),
        ("GET", "/admin/config/diff?from=x", None, 400),
        ("GET", "/admin/config/versions/0", None, 400),
        ("GET", "/admin/config/versions/7", None, 404),
        ("GET", "/admin/audit?since=yesterday", None, 400),
        ("GET", "/admin/audit?who=me", None, 400),
        ("GET", "/admin/audit?limit=0", None, 400),
    ],
)
async def test_bad_input_is_a_clear_4xx(served, method: str, path: str, payload: object, status: int) -> None:  # type: ignore[no-untyped-def]
    url = served[0]
    got, body = await call(method, url + path, "tok-admin", json=payload)
    assert got == status, body
    assert body["error"]["message"]


async def test_check_reports_errors_and_never_runs_commands(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, path, cfg, _ = served
    status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data=path.read_text())
    assert status == 200 and body == {"ok": True, "errors": [], "references": "unresolved"}
    bad = {**cfg, "models": {"m": {"deployments": ["missing"]}}}
    status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data=yaml.safe_dump(bad))
    assert status == 200 and body["ok"] is False
    assert any("models.m.deployments[0]: unknown deployment 'missing'" in e for e in body["errors"])
    status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data="a: [1,")
    assert body["ok"] is False and "invalid YAML" in body["errors"][0]
    marker = tmp_path / "ran"
    sneaky = {**cfg, "providers": {"a": {**cfg["providers"]["a"], "api_key": f"exec:touch {marker}"}}}
    status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data=yaml.safe_dump(sneaky))
    assert status == 200 and body["ok"] is True
    assert not marker.exists()


async def test_check_is_no_oracle_for_the_hosts_files_and_environment(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A viewer's check answers alike whether a file or variable exists, is readable, or holds
    several lines: it never reads them (only `edgeroute check` on the host does)."""
    url, _, cfg, _ = served
    here = tmp_path / "two-lines"
    here.write_text("line one\nline two\n")
    answers = []
    for ref in ("file:/etc/hostname", "file:/nonexistent/x", f"file:{here}", "env:HOME", "env:NOT_SET_ANYWHERE_1"):
        probe = {**cfg, "providers": {"a": {**cfg["providers"]["a"], "api_key": ref}}}
        status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data=yaml.safe_dump(probe))
        answers.append((status, body))
    assert answers == [(200, {"ok": True, "errors": [], "references": "unresolved"})] * 5
    tls = {**cfg["providers"]["a"], "tls": {"ca_bundle": "/nonexistent/ca.pem"}}
    status, body = await call(
        "POST", url + "/admin/config/check", "tok-viewer", data=yaml.safe_dump({**cfg, "providers": {"a": tls}})
    )
    assert (status, body["ok"]) == (200, True)
    empty = {**cfg, "providers": {"a": {**cfg["providers"]["a"], "api_key": "env:"}}}
    status, body = await call("POST", url + "/admin/config/check", "tok-viewer", data=yaml.safe_dump(empty))
    assert body["ok"] is False and any("providers.a.api_key: env: names nothing" in e for e in body["errors"])


async def test_literal_secrets_never_reach_the_database(served) -> None:  # type: ignore[no-untyped-def]
    url, path, cfg, _ = served
    cfg["providers"]["a"]["api_key"] = "sk-literal-one"
    write_config(path, cfg)
    assert (await call("POST", url + "/admin/reload", "tok-admin"))[0] == 200  # version 2
    cfg["providers"]["a"]["api_key"] = "sk-literal-two"
    cfg["models"]["m3"] = {"deployments": ["d-a"]}
    write_config(path, cfg)
    assert (await call("POST", url + "/admin/reload", "tok-admin"))[0] == 200  # version 3
    db = (path.parent / "edgeroute-ledger.db").read_bytes() + (path.parent / "edgeroute-ledger.db-wal").read_bytes()
    for secret in (b"sk-literal-one", b"sk-literal-two", b"tok-admin", b"literal-header-value"):
        assert secret not in db
    status, body = await call("GET", url + "/admin/config/versions/2", "tok-admin")
    assert body["config"]["providers"]["a"]["api_key"] == "****"
    # Version 2's literal key is not the running one: it cannot be restored, and nothing changes.
    status, body = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": 2})
    assert status == 409, body
    assert "the literal secret at providers.a.api_key was never stored" in str(body["error"]["problems"])
    assert (await call("GET", url + "/admin/config", "tok-admin"))[1]["version"] == 3
    # Version 1 differs only in what references and unchanged literals hold: it restores.
    status, body = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": 1})
    assert status == 200, body
    assert yaml.safe_load(path.read_text())["providers"]["a"]["headers"] == {"x-team-secret": "literal-header-value"}


async def test_the_cache_signing_key_and_experiment_salt_are_secrets_of_a_version(
    start_upstream, tmp_path: Path
) -> None:
    # Either one signs the shared cache's entries (and the salt picks experiment arms): whoever
    # reads a version or the database could forge an entry that every instance serves.
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": "tok-admin", "role": "admin"}}
    cfg["cache"] = {"signing_key": "cache-signing-literal-1"}
    cfg["learning"] = {"experiment_salt": "experiment-salt-literal-1"}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    server = TestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    try:
        url = f"http://127.0.0.1:{server.port}"
        status, body = await call("GET", url + "/admin/config/versions/1", "tok-admin")
        assert status == 200, body
        assert body["config"]["cache"]["signing_key"] == "****"
        assert body["config"]["learning"]["experiment_salt"] == "****"
        db = (tmp_path / "edgeroute-ledger.db").read_bytes() + (tmp_path / "edgeroute-ledger.db-wal").read_bytes()
        assert b"cache-signing-literal-1" not in db and b"experiment-salt-literal-1" not in db
    finally:
        await server.close()


def _old_scheme(value: str) -> str:
    """A literal secret as versions stored it before the keyed hash: an unsalted SHA-256."""
    return "redacted:sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


async def test_literal_secrets_are_stored_keyed_and_old_versions_still_restore(served) -> None:  # type: ignore[no-untyped-def]
    url, path, _, _ = served
    db_path = path.parent / "edgeroute-ledger.db"
    with sqlite3.connect(db_path) as db:
        (body,) = db.execute("SELECT body FROM gov_config_versions WHERE version = 1").fetchone()
    # A reader of the database cannot check a guess: plain SHA-256 of the secret is not there.
    stored = yaml.safe_load(body)
    header = stored["providers"]["a"]["headers"]["x-team-secret"]
    assert header.startswith("redacted:hmac-sha256:") and len(header) == len("redacted:hmac-sha256:") + 32
    assert stored["keys"]["root"]["token"] != stored["keys"]["ops"]["token"]
    for secret in ("literal-header-value", "tok-admin", "tok-operator"):
        assert hashlib.sha256(secret.encode()).hexdigest()[:16] not in body
    # A version stored by the old scheme (before an upgrade) still compares: it restores.
    old = yaml.safe_load(path.read_text())
    old["providers"]["a"]["headers"]["x-team-secret"] = _old_scheme("literal-header-value")
    for k in old["keys"].values():
        k["token"] = _old_scheme(k["token"])
    old["models"]["m-old"] = {"deployments": ["d-a"]}
    text = yaml.safe_dump(old, sort_keys=False)
    with sqlite3.connect(db_path) as db:
        row = db.execute(
            "INSERT INTO gov_config_versions (hash, created_at, source, applied_by, body)"
            " VALUES (?, ?, 'file', NULL, ?) RETURNING version",
            (hashlib.sha256(text.encode()).hexdigest(), time.time(), text),
        ).fetchone()
    status, got = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": row[0]})
    assert status == 200, got
    restored = yaml.safe_load(path.read_text())
    assert "m-old" in restored["models"] and restored["keys"]["root"]["token"] == "tok-admin"
    assert restored["providers"]["a"]["headers"] == {"x-team-secret": "literal-header-value"}


async def test_a_reloaded_config_answers_only_once_its_version_is_listed(served, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a slow database (a busy machine), a reloaded config must not answer before the
    admin API lists its version as the active one: clients and operators see one state."""
    url, path, cfg, _ = served
    add_version = GovStore.add_version

    def slow_database(self: GovStore, *args: Any) -> tuple[int, bool]:
        time.sleep(0.5)  # in the thread the version is written from, as a loaded disk would
        return add_version(self, *args)

    monkeypatch.setattr(GovStore, "add_version", slow_database)
    cfg["models"]["m2"] = {"deployments": ["d-a"]}
    write_config(path, cfg)
    reload = asyncio.ensure_future(call("POST", url + "/admin/reload", "tok-operator"))
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="tok-viewer")

    async def m2_served() -> bool:
        return "m2" in [m.id for m in (await client.models.list()).data]

    await eventually(m2_served, "model m2 after the reload", every=0.01)
    _, body = await call("GET", url + "/admin/config/versions", "tok-viewer")
    assert [(v["version"], v["active"]) for v in body["versions"]] == [(2, True), (1, False)]
    assert (await call("GET", url + "/admin/config", "tok-viewer"))[1]["version"] == 2
    assert (await reload)[0] == 200


async def test_rollback_guard_undoes_a_bad_reload(start_upstream, tmp_path: Path) -> None:
    good, bad = await start_upstream(), await start_upstream(fail_status=500)
    cfg = simple_config({"a": good})
    cfg["governance"] = {"rollback_guard": {"window_s": 20, "max_error_rate": 0.5, "min_requests": 5}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    app = create_app(config_mod.load(path), str(path))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    try:
        # A harmless reload is watched and kept.
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload"))[0] == 200
        for _ in range(6):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        # A reload that sends everything to a broken provider is rolled back by itself, within
        # the guard's window.
        cfg["providers"]["a"]["base_url"] = bad.base_url
        write_config(path, cfg)
        assert (await call("POST", url + "/admin/reload"))[0] == 200
        errors, window_ends = 0, time.monotonic() + patience(20)
        while True:
            try:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
                break
            except openai.APIStatusError:
                errors += 1
                assert time.monotonic() < window_ends, f"still failing after {errors} errors"
                await asyncio.sleep(0.1)
        assert errors >= 5  # min_requests
        # Answered by the rolled-back config: the versions say so already.
        _, versions = await call("GET", url + "/admin/config/versions")
        assert versions["versions"][0]["source"] == "auto_rollback:2"
        assert versions["versions"][0]["applied_by"] == "rollback-guard"
        assert versions["versions"][0]["active"]

        # The guard then audits its reason and writes the file back, off the request path. The
        # audit entry is written with the version, before the swap (no change unaudited); the
        # file after it (no reload reads the file meanwhile): right after the entry, it may not
        # be written yet.
        async def reason() -> list[dict[str, Any]]:
            _, audit = await call("GET", url + "/admin/audit?action=config.auto_rollback.reason")
            return list(audit["entries"])

        entries = await eventually(reason, "the rollback guard's audit entry with its reason")
        assert entries[0]["actor"] == "rollback-guard" and "error rate" in entries[0]["after"]["reason"]

        async def written_back() -> bool:
            return bool(yaml.safe_load(path.read_text())["providers"]["a"]["base_url"] == good.base_url)

        await eventually(written_back, "the config file written back")
    finally:
        await client.close()
        await server.close()


async def test_turning_managed_keys_on_takes_a_restart(served) -> None:  # type: ignore[no-untyped-def]
    url, path, cfg, _ = served
    write_config(path, {**cfg, "governance": {"managed_keys": True}})
    status, body = await call("POST", url + "/admin/reload", "tok-admin")
    assert status == 400
    assert "governance.managed_keys: changed; this setting takes effect on restart" in str(body["error"]["problems"])
    assert (await call("GET", url + "/admin/config", "tok-admin"))[1]["version"] == 1


async def test_a_reload_during_a_rollback_leaves_the_file_and_the_running_config_alike(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A rollback applies a version, then writes it over the file; a reload that read the file
    between the two applied the newer text while the file got the older one, and the next
    SIGHUP or restart switched config silently. The reload now waits for the write."""
    from edgeroute.governance import apply, versions

    url, path, cfg, _ = served
    cfg["models"]["second"] = {"deployments": ["d-a"]}
    write_config(path, cfg)
    assert (await call("POST", url + "/admin/reload", "tok-admin"))[0] == 200  # version 2, on file too
    slow_write = asyncio.Event()
    real_stage_write = versions.stage_write

    def stage_write_late(source: str, text: str) -> Any:
        slow_write.set()
        time.sleep(0.3)  # the window a reload fell into
        return real_stage_write(source, text)

    monkeypatch.setattr(apply, "stage_write", stage_write_late)

    async def reload_in_the_window() -> int:
        await slow_write.wait()
        return (await call("POST", url + "/admin/reload", "tok-admin"))[0]

    rolled, reloaded = await asyncio.gather(
        call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": 1}), reload_in_the_window()
    )
    assert rolled[0] == 200 and reloaded == 200
    status, models = await call("GET", url + "/v1/models", "tok-admin")
    assert status == 200
    running_second = "second" in str(models)
    assert running_second == ("second" in path.read_text())  # the file says what runs


def _start(store: GovStore, text: str, at_once: Any, running: list[int]) -> None:
    """An instance's start, as far as versions go: it records the config it runs."""
    from edgeroute.governance.versions import Versions

    at_once.wait()
    running.append(Versions(store).record(text, "edgeroute.yaml", None))


def test_instances_starting_at_once_record_one_version_of_the_same_config() -> None:
    """Instances started together with one config on an empty PostgreSQL database run the same
    version: each looked for the latest version and, finding none (or another), added its own in
    READ COMMITTED, so two or more identical versions were listed and the instances named
    different numbers for the config they all ran (a rollback to the previous one changed nothing)."""
    import threading
    import uuid

    import psycopg

    from tests.test_cost_support import require_postgres

    dsn, n = require_postgres(), 6
    schema = f"verrace_{uuid.uuid4().hex[:8]}"
    text = yaml.safe_dump(simple_config({}))
    try:
        for _ in range(5):  # the race is lost often, not always: each round starts on no versions
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                c.execute(f"CREATE SCHEMA {schema}")
            stores = [GovStore("postgres", f"{dsn}?options=-csearch_path%3D{schema}") for _ in range(n)]
            at_once = threading.Barrier(n)
            running: list[int] = []

            threads = [threading.Thread(target=_start, args=(s, text, at_once, running)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            listed = [v.version for v in stores[0].versions()]
            for s in stores:
                s.close()
            assert len(running) == n
            assert listed == [1] and set(running) == {1}, (listed, running)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
