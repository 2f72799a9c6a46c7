"""A config file's comments went into the config versions table as written when no parsed value
was a literal secret: a commented-out key (`# api_key: sk-proj-…`, `# was …`) sat in clear in
the database (a replica, a backup), which is promised literal secrets only as an HMAC. The
credentials in comments are redacted now; the comments themselves, and every value, are kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, eventually

OLD = "sk-proj-OLDKEYabcdefghijklmnop0123"
PREVIOUS = "sk-proj-PREVIOUSkeyabcdefghij0123456"
TEXT = f"""\
# the main provider
providers:
  p:
    base_url: https://upstream.example/v1
    api_key: env:FIXSEC_PROVIDER_KEY   # was {OLD}
#   api_key: {PREVIOUS}
deployments:
  d: {{provider: p, model: x}}
models:
  m: {{deployments: [d]}}
keys:
  root: {{token: env:FIXSEC_ROOT_TOKEN, role: admin}}
ledger: {{path: LEDGER}}
"""


async def test_a_key_in_a_comment_is_not_stored_in_config_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIXSEC_PROVIDER_KEY", "sk-unused-0123456789")
    monkeypatch.setenv("FIXSEC_ROOT_TOKEN", "tok-root-comments-0123456789")
    path = tmp_path / "edgeroute.yaml"
    path.write_text(TEXT.replace("LEDGER", str(tmp_path / "gov.db")))
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)))
    await server.start_server()
    try:

        async def stored() -> list[str]:
            with sqlite3.connect(tmp_path / "gov.db") as db:
                try:
                    return [body for (body,) in db.execute("SELECT body FROM gov_config_versions")]
                except sqlite3.OperationalError:  # not created yet
                    return []

        (body,) = await eventually(stored, "the start's version stored", within=10)
    finally:
        await server.close()
    assert OLD not in body and PREVIOUS not in body, body
    assert "# the main provider" in body and "env:FIXSEC_PROVIDER_KEY" in body, body  # the file as written otherwise
