"""Upstream connections through a forward proxy: a real CONNECT proxy on loopback, started
by the test, between the proxy under test and its (plain or TLS) upstreams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.config import ConfigError
from edgeroute.egress import Egress, bypassed, parse_proxy
from edgeroute.mock.openai import build_app
from tests.tls_fixtures import self_signed


class ConnectProxy:
    """A small CONNECT proxy: checks Basic credentials when given, records each tunnel's target."""

    def __init__(self, user: str | None = None, password: str | None = None) -> None:
        self.expected = None
        if user is not None:
            self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
            first, *lines = head.split("\r\n")
            method, target, _ = first.split(" ")
            hdrs = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines if line)}
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            if self.expected is not None and hdrs.get("proxy-authorization") != self.expected:
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n")
                return
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            up_r, up_w = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)


@pytest.fixture
async def connect_proxy() -> AsyncIterator[list[ConnectProxy]]:
    made: list[ConnectProxy] = []
    yield made
    for p in made:
        await p.close()


async def _start(made: list[ConnectProxy], **kwargs: Any) -> ConnectProxy:
    p = await ConnectProxy(**kwargs).start()
    made.append(p)
    return p


def _config(base_url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"base_url": base_url, "api_key": "sk-upstream-secret", **provider}},
        "deployments": {"d": {"provider": "up", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d"]}},
    }


async def _ask(url: str) -> str | None:
    # The test's own client ignores the proxy variables set for the proxy under test.
    http = openai.DefaultAsyncHttpxClient(trust_env=False)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, http_client=http)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return r.choices[0].message.content


async def test_https_upstream_through_https_proxy_env(
    tmp_path: Path, connect_proxy, start_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed(tmp_path, "egress ca")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(build_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        up_port = runner.addresses[0][1]
        fwd = await _start(connect_proxy)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{fwd.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        proxy = await start_proxy(_config(f"https://127.0.0.1:{up_port}/v1", tls={"ca_bundle": str(cert)}))
        assert (await _ask(proxy.url) or "").startswith("Hello from gpt-4o-mini")
        # TLS end to end inside the tunnel: the proxy saw only where, never what.
        assert fwd.targets == [f"127.0.0.1:{up_port}"]
    finally:
        await runner.cleanup()


async def test_provider_proxy_with_credentials(start_upstream, connect_proxy, start_proxy) -> None:
    up = await start_upstream()
    fwd = await _start(connect_proxy, user="egress-user", password="pr0xy-s3cret")
    proxy = await start_proxy(_config(up.base_url, proxy=f"http://egress-user:pr0xy-s3cret@127.0.0.1:{fwd.port}"))
    assert await _ask(proxy.url)
    assert fwd.targets == [f"127.0.0.1:{up.server.port}"]

    # Wrong credentials: the proxy refuses the tunnel; the client is told, without any credential.
    bad = await start_proxy(_config(up.base_url, proxy=f"http://egress-user:wrong-pa55@127.0.0.1:{fwd.port}"))
    with pytest.raises(openai.APIStatusError) as e:
        await _ask(bad.url)
    body = str(e.value.body)
    assert e.value.status_code == 502
    assert "wrong-pa55" not in body and "egress-user" not in body
    rec = bad.recorder.records[-1]
    assert rec.attempts and rec.attempts[0].error is not None and "wrong-pa55" not in rec.attempts[0].error


async def test_no_proxy_and_direct_bypass_the_environment(
    start_upstream, connect_proxy, start_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await start_upstream()
    fwd = await _start(connect_proxy)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{fwd.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert await _ask((await start_proxy(_config(up.base_url))).url)
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.delenv("no_proxy", raising=False)
    assert await _ask((await start_proxy(_config(up.base_url, proxy="direct"))).url)
    assert fwd.targets == []
    assert await _ask((await start_proxy(_config(up.base_url))).url)  # now through the proxy
    assert fwd.targets == [f"127.0.0.1:{up.server.port}"]


async def test_unreachable_proxy_is_a_connect_error(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(_config(up.base_url, proxy="http://user:hunter22@127.0.0.1:9"))
    with pytest.raises(openai.APIStatusError) as e:
        await _ask(proxy.url)
    assert e.value.status_code == 502 and "hunter22" not in str(e.value.body)
    assert proxy.recorder.records[-1].attempts[0].outcome == "connect_error"


def test_no_proxy_matching() -> None:
    assert bypassed("api.example.com", "example.com")
    assert bypassed("api.example.com", " .example.com ")
    assert bypassed("example.com", "*.example.com")
    assert not bypassed("badexample.com", "example.com")
    assert bypassed("127.0.0.1", "localhost,127.0.0.1:8080")
    assert bypassed("anything", "*")
    assert bypassed("::1", "[::1]:443")
    assert not bypassed("api.openai.com", "")


def test_proxy_urls_checked_without_revealing_credentials() -> None:
    assert parse_proxy("127.0.0.1:3128").port == 3128
    with pytest.raises(ValueError, match="http://"):
        parse_proxy("https://u:p@proxy:443")
    egress = Egress.build(None, {"HTTPS_PROXY": "http://proxy:8080", "no_proxy": "internal"})
    assert egress is not None and egress.proxy_for("api.openai.com", True) is not None
    assert egress.proxy_for("svc.internal", True) is None and egress.proxy_for("api.openai.com", False) is None
    assert Egress.build(None, {}) is None and Egress.build("direct", {"HTTPS_PROXY": "http://p:1"}) is None
    with pytest.raises(ConfigError) as e:
        config_mod.parse(_config("https://api.openai.com/v1", proxy="socks5://user:s3cr3t-pw@proxy:1080"), "t.yaml")
    assert "s3cr3t-pw" not in "\n".join(e.value.errors)
