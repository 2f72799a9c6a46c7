"""Literal secrets in stored config versions sealed under a key kept outside the store.

A literal secret in a stored version is an HMAC-SHA256 under a key the store keeps in the same
database (`gov_secrets`): anyone with a copy of the whole database (a backup) could check
guesses offline. With `governance.versions_key` (a reference) new versions are sealed under the
operator's key instead: the row holds nothing sealed under the store's key, a guess cannot be
confirmed without the operator's key, and rollbacks still restore the secret, to versions
sealed under the store's key before, and across a rotation of the operator's key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeroute import config as config_mod
from edgeroute import secrets
from tests.conftest import simple_config
from tests.governance_support import call, served_file, write_config

HEADER = "literal-header-value"  # a literal secret in the config file
KEY_A, KEY_B = "versions-key-a-5f1c0e", "versions-key-b-93d2aa"


def _row(path: Path, version: int) -> tuple[dict[str, Any], str, bytes]:
    """A version as a backup has it: its parsed body, its text, and the store's own key."""
    with sqlite3.connect(path.parent / "edgeroute-ledger.db") as db:
        (body,) = db.execute("SELECT body FROM gov_config_versions WHERE version = ?", (version,)).fetchone()
        (store_key,) = db.execute("SELECT value FROM gov_secrets WHERE name = 'versions'").fetchone()
    return yaml.safe_load(body), body, bytes.fromhex(store_key)


def _hmac(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


async def _rollback(url: str, version: int) -> None:
    status, got = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": version})
    assert status == 200 and got["rolled_back_to"] == version, got


async def test_versions_sealed_under_an_external_key(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["headers"] = {"x-team-secret": HEADER}
    cfg["keys"] = {"root": {"token": "tok-admin", "role": "admin"}}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    async with served_file(path):  # version 1: sealed under the store's own key, as before
        pass
    old, _, store_key = _row(path, 1)
    assert old["providers"]["a"]["headers"]["x-team-secret"] == "redacted:hmac-sha256:" + _hmac(store_key, HEADER)

    key_file = tmp_path / "versions.key"
    key_file.write_text(KEY_A + "\n")
    cfg["governance"] = {"versions_key": "file:versions.key"}  # relative to the config's directory
    write_config(path, cfg)
    async with served_file(path) as url:  # version 2: the start with the external key
        stored, body, store_key = _row(path, 2)
        marker = stored["providers"]["a"]["headers"]["x-team-secret"]
        assert "redacted:hmac-sha256:" not in body, body  # nothing sealed under the store's key
        for secret in (HEADER, "tok-admin"):
            assert _hmac(store_key, secret) not in body, secret  # a backup cannot confirm a guess
            assert secret not in body
        assert marker == "redacted:hmac-sha256-ext:" + _hmac(KEY_A.encode(), HEADER)

        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        status, _ = await call("POST", url + "/admin/reload", "tok-admin")
        assert status == 200  # version 3
        await _rollback(url, 2)  # version 4: the literal secrets come back from the running config
        back = yaml.safe_load(path.read_text())
        assert back["providers"]["a"]["headers"]["x-team-secret"] == HEADER and "m2" not in back["models"]
        assert back["keys"]["root"]["token"] == "tok-admin"

        key_file.write_text(KEY_B + "\n")  # the operator rotates the key: the secret's refresh reads it
        for _ in range(2):  # a changed file is read once it has stayed so for a refresh
            await asyncio.to_thread(secrets.refresh, 1e12)
        cfg["models"]["m3"] = {"deployments": ["d-a"]}
        write_config(path, cfg)
        status, _ = await call("POST", url + "/admin/reload", "tok-admin")
        assert status == 200  # version 5: sealed under the new key
        five, _, _ = _row(path, 5)
        assert five["providers"]["a"]["headers"]["x-team-secret"].endswith(_hmac(KEY_B.encode(), HEADER))
        await _rollback(url, 2)  # sealed under the key before the rotation: still restores
        assert yaml.safe_load(path.read_text())["providers"]["a"]["headers"]["x-team-secret"] == HEADER

        await _rollback(url, 1)  # sealed under the store's key before there was an external one
        back = yaml.safe_load(path.read_text())
        assert back["providers"]["a"]["headers"]["x-team-secret"] == HEADER and "governance" not in back

    # After a restart only the key given is known: version 2 (sealed under A) is refused until
    # the operator gives A after the new key.
    write_config(path, cfg)
    key_file.write_text("versions-key-c-77e0b1\n")
    async with served_file(path) as url:
        status, got = await call("POST", url + "/admin/config/rollback", "tok-admin", json={"version": 2})
        assert status == 409 and "governance.versions_key" in str(got), got
    key_file.write_text(f"versions-key-c-77e0b1 {KEY_A}\n")
    async with served_file(path) as url:
        await _rollback(url, 2)
        assert yaml.safe_load(path.read_text())["providers"]["a"]["headers"]["x-team-secret"] == HEADER


async def test_the_versions_key_must_be_a_reference(start_upstream: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["governance"] = {"versions_key": "a-literal-key"}
    try:
        config_mod.load(write_config(tmp_path / "edgeroute.yaml", cfg))
    except config_mod.ConfigError as e:
        assert any("versions_key" in p and "reference" in p for p in e.errors), e.errors
    else:
        raise AssertionError("a literal versions_key was accepted")


@pytest.mark.parametrize("value", [None, ""])
async def test_a_versions_key_that_does_not_resolve_is_a_config_error(
    start_upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """Named by `edgeroute check` and at `serve`'s start as any unresolvable key is: it was a
    traceback at start-up, and `check` said the config was fine."""
    if value is None:
        monkeypatch.delenv("EDGEROUTE_TEST_VERSIONS_KEY", raising=False)
    else:
        monkeypatch.setenv("EDGEROUTE_TEST_VERSIONS_KEY", value)
    cfg = simple_config({"a": await start_upstream()})
    cfg["governance"] = {"versions_key": "env:EDGEROUTE_TEST_VERSIONS_KEY"}
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(write_config(tmp_path / "edgeroute.yaml", cfg))
    assert any("governance.versions_key" in p for p in e.value.errors), e.value.errors
