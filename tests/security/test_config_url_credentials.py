"""Credentials written in a config's URLs: a provider's forward `proxy:` with a user and
password (the schema names it a credential to give by reference), a `base_url` or a tracing
endpoint with one. Every view of the config masks literal secrets, but these were shown as
written to any viewer key (`/admin/config`, a version, a diff) and stored in clear in the
config versions table, where every other literal secret is stored as its hash. They are
masked and stored as hashes now, and a rollback still takes them back from the running
config. A `base_url` with credentials is refused when the config loads: the upstream client
never sent them (the provider saw a request without them, and the operator no error)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute import config as config_mod
from edgeroute.state import STATE
from tests.security.governed import ROOT, call, config_views
from tests.test_cost_support import cost_proxy

VIEWER = "tok-viewer-0123456789"
PROXY = "http://egress-user:PROXY-PASS-0123@127.0.0.1:3128"
BASE = "https://BASE-TOKEN-0123@upstream.example/v1"  # refused at load
TRACES = "https://otel:TRACE-PASS-0123@otel.example/v1/traces"
SECRETS = ("PROXY-PASS-0123", "TRACE-PASS-0123")


def _config(tmp_path: Path) -> dict[str, Any]:
    price = {"input_per_mtok": 1, "output_per_mtok": 1}
    return {
        "providers": {"a": {"base_url": "https://upstream.example/v1", "api_key": "env:NOT_USED_HERE", "proxy": PROXY}},
        "deployments": {"d": {"provider": "a", "model": "x", "price": price}, "e": {"provider": "a", "model": "y"}},
        "models": {"m": {"deployments": ["d", "e"]}},
        "keys": {"root": {"token": ROOT, "role": "admin"}, "viewer": {"token": VIEWER, "role": "viewer"}},
        "ledger": {"path": str(tmp_path / "gov.db")},
        "tracing": {"enabled": False, "endpoint": TRACES},
    }


async def test_credentials_in_config_urls_are_masked_and_stored_as_hashes(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("NOT_USED_HERE", "sk-unused")
    async with cost_proxy(_config(tmp_path)) as proxy, aiohttp.ClientSession() as s:
        status, drained = await call(s, "POST", proxy.url + "/admin/deployments/e/drain", ROOT)
        assert status == 200, drained  # version 2
        for path, text in (await config_views(s, proxy.url, VIEWER)).items():
            assert not [word for word in SECRETS if word in text], (path, text)
        status, shown = await call(s, "GET", proxy.url + "/admin/config", VIEWER)
        provider = shown["config"]["providers"]["a"]
        assert provider["proxy"] == shown["config"]["tracing"]["endpoint"] == "****"

        with sqlite3.connect(tmp_path / "gov.db") as db:
            stored = [row for (row,) in db.execute("SELECT body FROM gov_config_versions")]
        assert stored and not [word for text in stored for word in SECRETS if word in text]

        status, rolled = await call(s, "POST", proxy.url + "/admin/config/rollback", ROOT, {"version": 1})
        assert status == 200, rolled
        running = proxy.app[STATE].live.config
        assert running.providers["a"].proxy == PROXY
        assert running.tracing.endpoint == TRACES
        assert running.deployments["e"].drained is False


def test_a_base_url_with_credentials_is_refused_naming_the_field_not_the_secret(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg["providers"]["a"]["base_url"] = BASE
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(cfg, "edge.yaml")
    (error,) = e.value.errors
    assert "providers.a.base_url" in error and "credentials" in error and "api_key" in error, error
    assert "BASE-TOKEN-0123" not in error


@pytest.mark.parametrize(
    "param",
    # A name that ends in one of the words was shown as written: S3's and GCS's presigned URLs,
    # OAuth's client secret, GitLab's private token, Azure API Management's subscription key;
    # a word inside the name, or its name spelt with percent-escapes, was shown too.
    ["api_key", "X-Amz-Signature", "X-Goog-Signature", "client_secret", "private_token", "x-api-key",
     "subscription-key", "access_key", "apiToken", "pwd", "passwd", "sessionid", "api%5Fkey", "sig_v4"],
)  # fmt: skip
async def test_a_key_in_a_urls_query_is_masked_and_stored_as_a_hash(
    tmp_path: Path, monkeypatch: Any, param: str
) -> None:
    """A credential in a URL's query (a collector's `?api_key=`, Google's `?key=`) is one too:
    a viewer read it in every view of the config, and the versions table held it in clear."""
    monkeypatch.setenv("NOT_USED_HERE", "sk-unused")
    cfg = _config(tmp_path)
    traces = f"https://otel.example/v1/traces?tenant=a&{param}=TRACE-QUERY-KEY-0123"
    cfg["tracing"]["endpoint"] = traces
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, drained = await call(s, "POST", proxy.url + "/admin/deployments/e/drain", ROOT)
        assert status == 200, drained  # version 2
        for path, text in (await config_views(s, proxy.url, VIEWER)).items():
            assert "TRACE-QUERY-KEY-0123" not in text, (path, text)
        with sqlite3.connect(tmp_path / "gov.db") as db:
            stored = [row for (row,) in db.execute("SELECT body FROM gov_config_versions")]
        assert stored and not [text for text in stored if "TRACE-QUERY-KEY-0123" in text]
        status, rolled = await call(s, "POST", proxy.url + "/admin/config/rollback", ROOT, {"version": 1})
        assert status == 200, rolled
        assert proxy.app[STATE].live.config.tracing.endpoint == traces
