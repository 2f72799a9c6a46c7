"""Class: revocation without its audit entry.

A managed key's creation, rotation and revocation were committed first and written to the
audit log after, in a second transaction: a process killed between the two (or an audit
write that failed: a locked or full database) left the change done, answered 200, and
absent from the audit log. Now the entry is written in the change's own transaction: a
change whose entry cannot be written is not made, and the caller is told so.

The audit write is made to fail by a trigger on the real database, put there by the test
(the stand-in for the process dying between the two writes); `edgeroute serve` runs as a
real process, the openai SDK is the client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai

from tests.conftest import simple_config
from tests.governance_support import call, instances, ledger_sql, write_config

ADMIN = "tok-admin"
_AUDIT_DOWN = "CREATE TRIGGER audit_down BEFORE INSERT ON gov_audit BEGIN SELECT RAISE(ABORT, 'audit log down'); END"


async def _chat(url: str, token: str) -> bool:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            return False
    return True


async def _audited(url: str, action: str, key_id: str) -> list[dict[str, Any]]:
    status, body = await call("GET", url + f"/admin/audit?action={action}", ADMIN)
    assert status == 200, body
    return [e for e in body["entries"] if e["target"] == key_id]


async def test_a_key_change_whose_audit_entry_cannot_be_written_is_not_made(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["keys"] = {"root": {"token": ADMIN, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    cfg["ledger"] = {"flush_interval": 0.1}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 1)
    (server,) = await asyncio.to_thread(cm.__enter__)
    try:
        status, made = await call("POST", server.url + "/admin/keys", ADMIN, json={"user": "ann"})
        assert status == 201, made
        key_id, token = made["id"], made["secret"]
        assert len(await _audited(server.url, "key.created", key_id)) == 1
        assert await _chat(server.url, token)

        await asyncio.to_thread(ledger_sql, tmp_path, _AUDIT_DOWN)
        # A revocation that cannot be audited is refused as a whole: not revoked, and not a 200.
        status, body = await call("DELETE", server.url + f"/admin/keys/{key_id}", ADMIN)
        assert status == 503 and body["error"]["code"] == "key_store_unavailable", (status, body)
        assert "nothing was changed" in body["error"]["message"], body
        status, shown = await call("GET", server.url + f"/admin/keys/{key_id}", ADMIN)
        assert status == 200 and shown["status"] == "active", shown
        # Nor is a rotation: the old secret still works, no new one was handed out.
        status, body = await call("POST", server.url + f"/admin/keys/{key_id}/rotate", ADMIN, json={})
        assert status == 503 and "secret" not in body, (status, body)
        assert await _chat(server.url, token)
        # Nor a creation.
        status, body = await call("POST", server.url + "/admin/keys", ADMIN, json={"user": "bob"})
        assert status == 503 and "secret" not in body, (status, body)
        status, listed = await call("GET", server.url + "/admin/keys", ADMIN)
        assert [k["user"] for k in listed["keys"] if k["source"] == "managed"] == ["ann"], listed

        # The audit log back: the revocation goes through, with its entry.
        await asyncio.to_thread(ledger_sql, tmp_path, "DROP TRIGGER audit_down")
        status, revoked = await call("DELETE", server.url + f"/admin/keys/{key_id}", ADMIN)
        assert status == 200 and revoked["status"] == "revoked", revoked
        entries = await _audited(server.url, "key.revoked", key_id)
        assert len(entries) == 1 and entries[0]["after"]["status"] == "revoked", entries
        assert entries[0]["actor"] == "root", entries
        assert not await _chat(server.url, token)
        assert await _audited(server.url, "key.rotated", key_id) == []
    finally:
        cm.__exit__(None, None, None)
