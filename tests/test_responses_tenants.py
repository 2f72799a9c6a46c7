"""A stored response is continued only by whom created it (`previous_response_id`).

The provider account behind a Responses deployment is every tenant's: edgeroute binds each
id it returns to the creator (the key's team, or the key) in the ledger's database, before
the id reaches the client, and answers another tenant's (or an unbound) id with OpenAI's own
404. `edgeroute serve` runs as a real process, restarted between the turns; the official
openai SDK is the client; the upstream mock keeps responses and continues them as OpenAI does."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml

from edgeroute.dispatch import JsonAnswer
from edgeroute.endpoints.container_owners import json_answer
from tests.conftest import simple_config
from tests.governance_support import call, instances, ledger_sql, write_config
from tests.test_cost_support import require_redis

ALICE, ALICE_TOO, BOB, LONE = "sk-alice-1", "sk-alice-2", "sk-bob-1", "sk-lone-1"


def _client(url: str, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)


async def _create(url: str, token: str, text: str, prev: str | None = None, stream: bool = False) -> tuple[str, str]:
    """(the response's id, its output text) as the SDK reads them."""
    async with _client(url, token) as client:
        if not stream:
            r = await client.responses.create(model="m", input=text, previous_response_id=prev)
            return r.id, r.output_text
        rid, out = "", ""
        async for ev in await client.responses.create(model="m", input=text, previous_response_id=prev, stream=True):
            if ev.type == "response.created":
                rid = ev.response.id
            elif ev.type == "response.completed":
                out = ev.response.output_text
        return rid, out


def _config(up: Any, tmp_path: Path, keys: dict[str, Any] | None) -> Path:
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["kind"] = "openai"  # speaks Responses: the request is relayed as is
    if keys is not None:
        cfg["keys"] = keys
    return write_config(tmp_path / "edgeroute.yaml", cfg)


_KEYS = {
    "alice": {"token": ALICE, "team": "alice"},
    "alice2": {"token": ALICE_TOO, "team": "alice"},
    "bob": {"token": BOB, "team": "bob"},
    "lone": {"token": LONE},
}


@pytest.mark.parametrize("stream", [False, True])
async def test_another_tenant_cannot_continue_a_stored_response_across_a_restart(
    start_upstream: Any, tmp_path: Path, stream: bool
) -> None:
    up = await start_upstream()
    path = _config(up, tmp_path, _KEYS)
    with instances(path, 1) as (server,):
        alice_id, _ = await _create(server.url, ALICE, "alpha-secret", stream=stream)
        lone_id, _ = await _create(server.url, LONE, "lone-secret", stream=stream)
    assert alice_id.startswith("resp_mock") and lone_id.startswith("resp_mock")

    with instances(path, 1) as (server,):  # a restart: the bindings are in the ledger's database
        for token, rid in ((BOB, alice_id), (LONE, alice_id), (BOB, lone_id), (ALICE, lone_id)):
            with pytest.raises(openai.NotFoundError) as e:
                await _create(server.url, token, "what did I say?", rid, stream=stream)
            assert e.value.status_code == 404
            body = e.value.body
            assert isinstance(body, dict)
            assert body["code"] == "previous_response_not_found" and body["param"] == "previous_response_id"
            assert body["message"] == f"Previous response with id '{rid}' not found."
            assert "secret" not in str(body)
        # The creator (and its team) continue, and the model sees the conversation.
        _, out = await _create(server.url, ALICE, "what did I say?", alice_id, stream=stream)
        assert "alpha-secret" in out
        next_id, out = await _create(server.url, ALICE_TOO, "and then?", alice_id, stream=stream)
        assert "alpha-secret" in out
        _, out = await _create(server.url, LONE, "what did I say?", lone_id, stream=stream)
        assert "lone-secret" in out
        # A continuation's id is bound too.
        with pytest.raises(openai.NotFoundError):
            await _create(server.url, BOB, "again", next_id, stream=stream)
        # No route reads or deletes a stored response: the provider's would serve anyone's.
        async with _client(server.url, BOB) as client:
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(alice_id)
            with pytest.raises(openai.NotFoundError):
                await client.responses.input_items.list(alice_id)
            with pytest.raises(openai.NotFoundError):
                await client.responses.delete(alice_id)


async def test_an_id_edgeroute_never_returned_is_refused_as_unknown(start_upstream: Any, tmp_path: Path) -> None:
    """An id made at the provider directly (or before edgeroute bound ids) has no owner: it is
    refused as OpenAI refuses an unknown id, though the provider has it."""
    up = await start_upstream()
    async with openai.AsyncOpenAI(base_url=up.base_url, api_key="key-a", max_retries=0) as direct:
        made = await direct.responses.create(model="gpt-4o-mini", input="made-elsewhere")
    path = _config(up, tmp_path, _KEYS)
    with instances(path, 1) as (server,):
        with pytest.raises(openai.NotFoundError) as e:
            await _create(server.url, ALICE, "continue", made.id)
        assert isinstance(e.value.body, dict) and e.value.body["code"] == "previous_response_not_found"
    rows = await asyncio.to_thread(_owners, tmp_path)
    assert made.id not in rows


async def test_a_keyless_sidecar_continues_its_responses_with_no_setup(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    path = _config(up, tmp_path, None)
    with instances(path, 1) as (server,):
        rid, _ = await _create(server.url, "unused", "sidecar-secret")
        _, out = await _create(server.url, "unused", "what did I say?", rid)
    assert "sidecar-secret" in out


async def test_two_instances_on_postgres_share_the_bindings(
    pg_schema_dsn: str, start_upstream: Any, tmp_path: Path
) -> None:
    """An id made through one instance is continued through another by its tenant only. The
    bindings live in a schema of the test's own: in `public`, another run's server held the
    ledger alone (neither instance started) or dropped the bindings' table meanwhile."""
    dsn = pg_schema_dsn
    up = await start_upstream()
    shared = {"redis_url": require_redis(), "prefix": f"rt-{uuid.uuid4().hex[:8]}"}
    cfg = simple_config({"a": up}, keys=_KEYS, ledger={"backend": "postgres", "dsn": dsn}, shared_state=shared)
    cfg["providers"]["a"]["kind"] = "openai"
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    with instances(path, 2) as (one, two):
        rid, _ = await _create(one.url, BOB, "bravo-secret", stream=True)
        with pytest.raises(openai.NotFoundError):
            await _create(two.url, ALICE, "what did bob say?", rid)
        _, out = await _create(two.url, BOB, "what did I say?", rid)
    assert "bravo-secret" in out


def _owners(config_dir: Path) -> dict[str, str]:
    conn = sqlite3.connect(config_dir / "edgeroute-ledger.db", timeout=10)
    try:
        return dict(conn.execute("SELECT id, owner FROM gov_response_owners").fetchall())
    finally:
        conn.close()


def _ledger(config_dir: Path, sql: str) -> None:
    conn = sqlite3.connect(config_dir / "edgeroute-ledger.db", timeout=10)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


async def test_a_binding_that_cannot_be_written_or_read_never_lets_an_id_through(
    start_upstream: Any, tmp_path: Path
) -> None:
    """While the bindings cannot be read, a continuation is a 503 (never passed unchecked); an
    answer whose binding could not be written is still given, and its id is then refused."""
    up = await start_upstream()
    path = _config(up, tmp_path, _KEYS)
    with instances(path, 1) as (server,):
        before, _ = await _create(server.url, ALICE, "kept-secret")
        await asyncio.to_thread(_ledger, tmp_path, "ALTER TABLE gov_response_owners RENAME TO owners_away")
        during, out = await _create(server.url, ALICE, "unbound-secret")  # answered, its binding lost
        assert "unbound-secret" in out
        with pytest.raises(openai.InternalServerError) as e:
            await _create(server.url, ALICE, "what did I say?", before)
        assert e.value.status_code == 503
        assert isinstance(e.value.body, dict) and e.value.body["code"] == "owner_check_unavailable"
        await asyncio.to_thread(_ledger, tmp_path, "ALTER TABLE owners_away RENAME TO gov_response_owners")
        _, out = await _create(server.url, ALICE, "what did I say?", before)
        assert "kept-secret" in out
        with pytest.raises(openai.NotFoundError):
            await _create(server.url, ALICE, "what did I say?", during)


async def test_bindings_older_than_a_stored_response_are_dropped(start_upstream: Any, tmp_path: Path) -> None:
    """A binding goes once the provider no longer keeps its response (30 days): the table does
    not grow with every request forever, and the id is then unknown here as there."""
    up = await start_upstream()
    path = _config(up, tmp_path, _KEYS)
    with instances(path, 1) as (server,):
        old, _ = await _create(server.url, ALICE, "old-secret")
        fresh, _ = await _create(server.url, ALICE, "fresh-secret")
    month = 31 * 86400
    await asyncio.to_thread(_ledger, tmp_path, f"UPDATE gov_response_owners SET ts = ts - {month} WHERE id = '{old}'")
    with instances(path, 1) as (server,):
        await _create(server.url, BOB, "any answer prunes")
        assert old not in await asyncio.to_thread(_owners, tmp_path)
        with pytest.raises(openai.NotFoundError):
            await _create(server.url, ALICE, "what did I say?", old)
        _, out = await _create(server.url, ALICE, "what did I say?", fresh)
    assert "fresh-secret" in out


async def test_managed_keys_alone_are_tenants_too(start_upstream: Any, tmp_path: Path) -> None:
    """Managed keys (made through the admin API) are told apart by team, also once the config
    names no key of its own: a server whose only keys are managed ones passed every id through."""
    up = await start_upstream()
    path = _config(up, tmp_path, {"ops": {"token": "sk-ops-admin", "role": "admin"}})
    cfg: dict[str, Any] = yaml.safe_load(path.read_text())
    cfg["governance"] = {"managed_keys": True}
    write_config(path, cfg)
    with instances(path, 1) as (server,):
        made = {}
        for team in ("red", "blue"):
            status, key = await call("POST", server.url + "/admin/keys", "sk-ops-admin", json={"team": team})
            assert status == 201, key
            made[team] = key["secret"]
    # Keys a config key made before they named it as their parent stay when it goes (a key made
    # now ends with its maker): such keys alone, from the ledger's database.
    ledger_sql(tmp_path, "UPDATE gov_keys SET data = json_remove(data, '$.parent')")
    del cfg["keys"]
    write_config(path, cfg)
    with instances(path, 1) as (server,):
        rid, _ = await _create(server.url, made["red"], "red-secret", stream=True)
        with pytest.raises(openai.NotFoundError):
            await _create(server.url, made["blue"], "what did red say?", rid)
        _, out = await _create(server.url, made["red"], "what did I say?", rid)
    assert "red-secret" in out


async def test_a_client_gone_while_its_id_is_bound_gives_back_the_deployments_slot(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The binding is written while the stream is held: a client that leaves then (the
    database slow) must not keep the deployment's one concurrency slot for good."""
    up = await start_upstream()
    path = _config(up, tmp_path, _KEYS)
    cfg: dict[str, Any] = yaml.safe_load(path.read_text())
    cfg["deployments"]["d-a"]["max_concurrency"] = 1
    write_config(path, cfg)
    with instances(path, 1) as (server,):
        await _create(server.url, ALICE, "first")  # the tables exist
        lock = sqlite3.connect(tmp_path / "edgeroute-ledger.db", timeout=10, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # the binding waits on the database
            async with openai.AsyncOpenAI(
                base_url=server.url + "/v1", api_key=ALICE, max_retries=0, timeout=1.0
            ) as client:
                with pytest.raises(openai.APITimeoutError):
                    await client.responses.create(model="m", input="leaving", stream=True)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for _ in range(3):  # a leaked slot would refuse these (max_concurrency 1)
            _, out = await _create(server.url, ALICE, "after", stream=True)
            assert "after" in out


def test_an_answer_parsed_by_its_reader_is_read_again_once_its_body_changed() -> None:
    """A native answer's ids are read from the object its reader parsed (not parsed again),
    but only while the body sent is the one parsed: a body rewritten since is read itself."""
    body = b'{"id":"resp_1","output":[]}'
    got = JsonAnswer(body, None, (body, orjson.loads(body)))
    assert (found := json_answer(got)) is not None and found["id"] == "resp_1"
    got.body = b'{"id":"resp_2","output":[]}'
    assert (found := json_answer(got)) is not None and found["id"] == "resp_2"
