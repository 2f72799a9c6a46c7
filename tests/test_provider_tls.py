"""Providers behind a private CA and behind mutual TLS, called through the proxy.

The upstream is the mock OpenAI server on an https listener with a throwaway
certificate; the client is the official `openai` SDK talking to the real proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.mock.openai import build_app
from tests.conftest import Proxy
from tests.tls_fixtures import self_signed

Start = Callable[[ssl.SSLContext], Awaitable[str]]


@pytest.fixture
async def start_https_upstream() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def start(ctx: ssl.SSLContext) -> str:
        runner = web.AppRunner(build_app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        return f"https://127.0.0.1:{runner.addresses[0][1]}/v1"

    yield start
    for r in runners:
        await r.cleanup()


def _config(base_url: str, tls: dict[str, str] | None) -> dict[str, Any]:
    provider: dict[str, Any] = {"base_url": base_url, "api_key": "sk-upstream-secret"}
    if tls is not None:
        provider["tls"] = tls
    return {
        "providers": {"private": provider},
        "deployments": {"d": {"provider": "private", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def _ask(proxy: Proxy) -> str | None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return r.choices[0].message.content


async def test_private_ca_bundle(
    tmp_path: Path, start_https_upstream: Start, start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]]
) -> None:
    cert, key = self_signed(tmp_path, "private ca")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    url = await start_https_upstream(server)

    trusting = await start_proxy(_config(url, {"ca_bundle": str(cert)}))
    assert await _ask(trusting)

    # Without the bundle the system trust store rejects the certificate: a 502 that says why.
    untrusting = await start_proxy(_config(url, None))
    with pytest.raises(openai.APIStatusError) as e:
        await _ask(untrusting)
    assert e.value.status_code == 502
    assert "TLS handshake failed: certificate not trusted" in str(e.value.body)
    assert "sk-upstream-secret" not in str(e.value.body)


async def test_mutual_tls_client_certificate(
    tmp_path: Path, start_https_upstream: Start, start_proxy: Callable[[dict[str, Any]], Awaitable[Proxy]]
) -> None:
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(server_cert, server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(client_cert))
    url = await start_https_upstream(server)

    ok = await start_proxy(
        _config(url, {"ca_bundle": str(server_cert), "client_cert": str(client_cert), "client_key": str(client_key)})
    )
    assert await _ask(ok)

    anonymous = await start_proxy(_config(url, {"ca_bundle": str(server_cert)}))
    with pytest.raises(openai.APIStatusError) as e:
        await _ask(anonymous)
    # TLS 1.3 refuses a missing client certificate after the handshake: a closed connection.
    assert e.value.status_code == 502


def test_unreadable_tls_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(_config("https://example.invalid/v1", {"ca_bundle": str(tmp_path / "missing.pem")}), "t.yaml")
    assert "providers.private.tls.ca_bundle: no readable file at" in str(e.value)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(_config("https://example.invalid/v1", {"client_cert": str(tmp_path / "junk.pem")}), "t.yaml")
    assert "providers.private.tls" in str(e.value)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(_config("https://example.invalid/v1", {"client_key": str(tmp_path / "junk.pem")}), "t.yaml")
    assert "a client_key needs a client_cert" in str(e.value)
