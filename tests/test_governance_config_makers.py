"""Keys made by a config key end with it and share its limits, as keys made by a managed key do.

A config key's minted keys had no parent: removing a leaked config key from the config (its only
revocation) left the admin keys it had made working, demoting it reached nothing it made, and its
rate limit and `scope: key` budget bounded none of them. A key made by a config key now records
`parent: "config:<id>"`; it is refused (401 `key_revoked`, naming the config key) once that key is
gone from the config or no longer has the role or team to make it, and its requests take from the
config key's rate limits and budgets too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from edgeroute.governance import keys as K
from tests.conftest import eventually, simple_config
from tests.governance_support import call, served_file, write_config

ROOT = "tok-root-0123456789"
MAKER = "tok-maker-0123456789"

Served = tuple[str, Path, dict[str, Any]]


@pytest.fixture
async def served(start_upstream: Any, tmp_path: Path) -> AsyncIterator[Served]:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {
        "root": {"token": ROOT, "role": "admin"},
        "maker": {"token": MAKER, "role": "admin", "team": "alpha", "limits": {"rpm": 2}},
    }
    cfg["governance"] = {"managed_keys": True}
    path = tmp_path / "edgeroute.yaml"
    async with served_file(path, cfg) as url:
        yield url, path, cfg


async def _reload(url: str, path: Path, cfg: dict[str, Any]) -> None:
    write_config(path, cfg)
    status, body = await call("POST", url + "/admin/reload", ROOT)
    assert status == 200, body


async def test_keys_a_config_key_made_end_when_it_is_removed(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    url, path, cfg = served
    status, made = await call("POST", url + "/admin/keys", MAKER, json={"role": "admin", "rpm": 2})
    assert status == 201 and made["parent"] == "config:maker", made
    status, grand = await call("POST", url + "/admin/keys", made["secret"], json={"role": "service", "rpm": 2})
    assert status == 201 and grand["parent"] == made["id"], grand
    assert (await call("GET", url + "/admin/keys", made["secret"]))[0] == 200
    del cfg["keys"]["maker"]  # the leaked config key is taken out
    await _reload(url, path, cfg)
    for secret in (made["secret"], grand["secret"]):
        status, err = await call("GET", url + "/admin/keys", secret)
        assert status == 401 and err["error"]["code"] == "key_revoked", err
        assert "config key maker" in err["error"]["message"], err
    status, listed = await call("GET", url + f"/admin/keys/{made['id']}", ROOT)
    assert status == 200 and (listed["status"], listed["ended_by"]) == ("revoked", "config:maker"), listed
    # A typo in the key's id ends them the same way: the operator is told, not left to find out.
    said = [r.getMessage() for r in caplog.records if "ended, made by config key maker" in r.getMessage()]
    assert said and said[0].startswith("managed keys: 2 key(s) ended"), said


async def test_keys_a_config_key_made_end_when_it_is_demoted_below_them(served: Served) -> None:
    url, path, cfg = served
    status, admin = await call("POST", url + "/admin/keys", MAKER, json={"role": "admin", "rpm": 2})
    assert status == 201, admin
    status, viewer = await call("POST", url + "/admin/keys", MAKER, json={"role": "viewer", "rpm": 2})
    assert status == 201, viewer
    cfg["keys"]["maker"]["role"] = "viewer"
    await _reload(url, path, cfg)
    status, err = await call("POST", url + "/admin/keys", admin["secret"], json={"role": "service"})
    assert status == 401 and err["error"]["code"] == "key_revoked", err
    assert "whose role no longer allows it" in err["error"]["message"], err
    assert (await call("GET", url + "/admin/deployments", viewer["secret"]))[0] == 200  # within its role: works


async def test_keys_a_config_key_made_share_its_rate_limit(served: Served) -> None:
    url, _, _ = served
    status, child = await call("POST", url + "/admin/keys", MAKER, json={"role": "service", "rpm": 2})
    assert status == 201, child
    ask: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    maker = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MAKER, max_retries=0)
    minted = openai.AsyncOpenAI(base_url=url + "/v1", api_key=child["secret"], max_retries=0)
    try:
        for _ in range(2):
            await maker.chat.completions.create(**ask)
        with pytest.raises(openai.RateLimitError):
            await minted.chat.completions.create(**ask)  # its maker's minute is spent
    finally:
        await maker.close()
        await minted.close()


async def test_keys_a_config_key_made_spend_its_budget(served: Served) -> None:
    url, path, cfg = served
    cfg["budgets"] = {"limits": [{"name": "maker-day", "scope": "key", "match": "maker", "period": "day",
                                  "limit_usd": 0.000001}]}  # fmt: skip
    await _reload(url, path, cfg)
    status, child = await call("POST", url + "/admin/keys", MAKER, json={"role": "service", "rpm": 2})
    assert status == 201, child
    status, free = await call("POST", url + "/admin/keys", ROOT, json={"role": "service", "team": "alpha"})
    assert status == 201, free
    ask: Any = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    minted = openai.AsyncOpenAI(base_url=url + "/v1", api_key=child["secret"], max_retries=0)
    other = openai.AsyncOpenAI(base_url=url + "/v1", api_key=free["secret"], max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError, match="maker-day"):
            await minted.chat.completions.create(**ask)  # its maker's budget has no room
        await other.chat.completions.create(**ask)  # a key the config key did not make: served
    finally:
        await minted.close()
        await other.close()


async def test_a_key_made_while_its_config_maker_is_removed_is_refused(served: Served) -> None:
    """A leaked config key holds a creation open (its body trickled) while the admin removes it:
    the key made when the body came in had no parent (its maker gone from the config), and so
    outlived the removal that was to end everything the key had made."""
    url, path, cfg = served
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps({"role": "admin", "name": "held", "rpm": 2})
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /admin/keys HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {MAKER}\r\n"
    writer.write(f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5])
    await writer.drain()
    await asyncio.sleep(0.3)  # the request is identified and reading its body
    del cfg["keys"]["maker"]
    await _reload(url, path, cfg)
    writer.write(body[5:])
    answer = await reader.read(65536)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"key_revoked" in answer
    status, keys = await call("GET", url + "/admin/keys", ROOT)
    assert status == 200 and all(k.get("name") != "held" for k in keys["keys"]), keys


async def test_a_config_keys_id_given_to_another_token_does_not_revive_its_keys(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A config key removed ends the keys it made; an operator who then gave its id to someone
    else (another token) revived them for their old holder. Only the same token restores them."""
    url, path, cfg = served
    status, made = await call("POST", url + "/admin/keys", MAKER, json={"role": "admin", "rpm": 2})
    assert status == 201, made
    assert "parent_fp" not in made and MAKER not in orjson.dumps(made).decode()
    held = cfg["keys"].pop("maker")
    await _reload(url, path, cfg)
    assert (await call("GET", url + "/admin/keys", made["secret"]))[0] == 401
    cfg["keys"]["maker"] = {**held, "token": "tok-someone-else-0123456789"}  # the id, reused
    await _reload(url, path, cfg)
    status, err = await call("GET", url + "/admin/keys", made["secret"])
    assert status == 401 and err["error"]["code"] == "key_revoked", err
    assert "back with another token" in err["error"]["message"], err
    said = [r.getMessage() for r in caplog.records if "stay ended" in r.getMessage()]
    assert said and "1 key(s) made by config key maker" in said[0], said
    status, listed = await call("GET", url + f"/admin/keys/{made['id']}", ROOT)
    assert status == 200 and listed["status"] == "revoked" and "parent_fp" not in listed, listed
    cfg["keys"]["maker"] = held  # put back as it was: they work again
    await _reload(url, path, cfg)
    assert (await call("GET", url + "/admin/keys", made["secret"]))[0] == 200


async def _file_maker(start_upstream: Any, tmp_path: Path) -> tuple[Path, dict[str, Any], Path]:
    """A config whose admin key `maker` reads its token from a file (v1): (that file, config, its path)."""
    secret = tmp_path / "maker.token"
    secret.write_text("tok-maker-v1-0123456789")
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {
        "root": {"token": ROOT, "role": "admin"},
        "maker": {"token": f"file:{secret}", "role": "admin", "team": "alpha"},
    }
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.1}
    return secret, cfg, tmp_path / "edgeroute.yaml"


async def _two_levels(url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A key `maker` (v1) made, and a key that one made."""
    status, made = await call("POST", url + "/admin/keys", "tok-maker-v1-0123456789", json={"role": "admin"})
    assert status == 201, made
    status, grand = await call("POST", url + "/admin/keys", made["secret"], json={"role": "service"})
    assert status == 201, grand
    return made, grand


async def test_a_config_keys_token_rotated_in_place_keeps_the_keys_it_made(
    start_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """red8 G3: a config key's token rotated through its `file:` reference (a mounted secret
    rotated) ended every key it had made at the next reload, even one for another change: 401
    `key_revoked` for the team's services. While its id stays in the config, a new token now
    carries its keys over (logged, audited), for this instance, a restart, and others."""
    secret, cfg, path = await _file_maker(start_upstream, tmp_path)
    async with served_file(path, cfg) as url:
        made, grand = await _two_levels(url)
        secret.write_text("tok-maker-v2-0123456789")  # the secret rotated
        cfg["models"]["m2"] = {"deployments": ["d-a"]}  # reloaded for another change
        await _reload(url, path, cfg)
        for key in (made, grand):
            status, body = await call("GET", url + "/v1/models", key["secret"])
            assert status == 200, body
        assert (await call("GET", url + "/v1/models", "tok-maker-v1-0123456789"))[0] == 401  # the old token: no key

        async def audited() -> list[dict[str, Any]] | None:
            _, body = await call("GET", url + "/admin/audit?action=key.maker_token_changed", ROOT)
            return body["entries"] or None

        entry = (await eventually(audited, "the carry-over audited"))[0]
        assert entry["target"] == "config:maker" and entry["after"] == {"keys_carried_over": 1}, entry
        said = [r.getMessage() for r in caplog.records if "has a new token" in r.getMessage()]
        assert said == ["managed keys: config key maker has a new token: 1 key(s) it made carried over to it"]
        status, listed = await call("GET", url + f"/admin/keys/{made['id']}", ROOT)
        assert listed["status"] == "active" and not {"parent_fp", "parent_fp_was"} & set(listed), listed
    async with served_file(path) as url:  # a restart knows the new token alone
        for key in (made, grand):
            status, body = await call("GET", url + "/v1/models", key["secret"])
            assert status == 200, body


async def test_a_config_keys_token_rotated_while_stopped_keeps_the_keys_it_made(
    start_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config key's token rotated while edgeroute was stopped (its `file:` secret replaced
    before the start) ended every key it had made at that start: 401 `key_revoked`, "back with
    another token", where the same rotation through a reload carried them over. The store now
    records each config key's token (a salted fingerprint) as an instance last ran with it: a
    start with another one for the same id carries its keys over, as a reload does, and does so
    again at the next rotation while stopped. An id removed (its record dropped) and given to
    another token while stopped still ends them."""
    secret, cfg, path = await _file_maker(start_upstream, tmp_path)
    async with served_file(path, cfg) as url:
        made, grand = await _two_levels(url)
    for token in ("tok-maker-v2-0123456789", "tok-maker-v3-0123456789"):
        secret.write_text(token)  # rotated while stopped, twice in turn
        async with served_file(path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=grand["secret"], max_retries=0)
            await client.models.list()  # served at once, before any poll
            status, body = await call("GET", url + "/admin/keys", made["secret"])
            assert status == 200, body

            async def audited() -> list[dict[str, Any]] | None:
                _, body = await call("GET", url + "/admin/audit?action=key.maker_token_changed", ROOT)
                return body["entries"] or None

            entry = (await eventually(audited, "the carry-over audited"))[0]
            assert entry["target"] == "config:maker" and entry["after"] == {"keys_carried_over": 1}, entry
    assert not [r for r in caplog.records if "stay ended" in r.getMessage()]
    held = cfg["keys"].pop("maker")
    async with served_file(path, cfg):  # removed while stopped, then given to someone else
        pass
    cfg["keys"]["maker"] = {**held, "token": "tok-someone-else-0123456789"}
    async with served_file(path, cfg) as url:
        status, err = await call("GET", url + "/admin/keys", made["secret"])
        assert status == 401 and "back with another token" in err["error"]["message"], err


async def test_keys_made_before_the_store_recorded_tokens_survive_a_rotation_while_stopped(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Keys made before this release record their maker's token under a random salt, which no
    record of the store can find: the first start gives them the config key's own salt (the same
    token, nothing else changed), so the next rotation while stopped carries them over too."""
    secret, cfg, path = await _file_maker(start_upstream, tmp_path)
    async with served_file(path, cfg) as url:
        made, _ = await _two_levels(url)
    digest = hashlib.sha256(b"tok-maker-v1-0123456789").hexdigest()
    legacy = K.maker_fingerprint(digest, os.urandom(16))  # as a release before this one wrote it
    db = sqlite3.connect(tmp_path / "edgeroute-ledger.db")
    with db:
        (data,) = db.execute("SELECT data FROM gov_keys WHERE id = ?", (made["id"],)).fetchone()
        db.execute("UPDATE gov_keys SET data = ? WHERE id = ?", (orjson.dumps({**orjson.loads(data),
                   "parent_fp": legacy}).decode(), made["id"]))  # fmt: skip
        db.execute("DELETE FROM gov_secrets WHERE name LIKE 'maker:%'")  # nor did it record tokens

    def stored() -> dict[str, Any]:
        (data,) = db.execute("SELECT data FROM gov_keys WHERE id = ?", (made["id"],)).fetchone()
        return dict(orjson.loads(data))

    async with served_file(path) as url:  # the upgrade's start, with the same token

        async def salted_again() -> bool:
            return bool(stored()["parent_fp"] != legacy)

        await eventually(salted_again, "the key given its maker's own salt")
        assert (await call("GET", url + "/admin/keys", made["secret"]))[0] == 200
    secret.write_text("tok-maker-v2-0123456789")
    async with served_file(path) as url:
        status, body = await call("GET", url + "/admin/keys", made["secret"])
        assert status == 200, body
    db.close()
