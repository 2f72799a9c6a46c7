"""A Bedrock provider without credentials of its own takes them from botocore's chain (the
environment, a profile, an instance or task role: the usual production set-up, with a session
token). Those values came from no reference of edgeroute's, so the redactor did not know them,
and no credential shape matched `X-Amz-Security-Token`: an upstream (a VPC endpoint's proxy, a
misrouted `base_url`) quoting the request's headers back in its error sent the operator's AWS
session token to the client, on every API, and into the request log. Now each set of chain
credentials is a secret from its first use, and `…security-token`/`session_token` pairs are a
credential shape whoever's they are."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.providers_fixtures import MockUpstream, provider_config
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

KEY_ID = "ASIAY34FZKBOKMUTVV7A"
SECRET = "Zq9w8e7r6t5y4u3i2o1pAaSsDdFfGgHhJjKkLlMm"
TOKEN = "FwoGZXIvYXdzEPT//////////wEaDHtopsecretSessionTokenValue0123456789abcdefXYZ"


@pytest.fixture
def chain_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def _echoing_bedrock(serve_routes: ServeRoutes) -> MockUpstream:
    """A Bedrock endpoint whose 400 quotes the request's headers, as some proxies in front of one do."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        quoted = orjson.dumps({str(k): v for k, v in request.headers.items()}).decode()
        return web.json_response({"message": f"Malformed input request, headers: {quoted}"}, status=400)

    return MockUpstream("bedrock", await serve_routes(web.post("/{tail:.*}", handle)), None)


async def test_an_upstream_quoting_the_signed_headers_gets_no_chain_credential_to_the_client(
    chain_credentials: None, serve_routes: ServeRoutes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    rock = await _echoing_bedrock(serve_routes)
    cfg = provider_config({"b": rock})
    cfg["providers"]["b"]["options"] = {"region": "us-east-1"}  # no keys of its own: the chain's
    # The request log keeps the upstream's words (`full`): credentials are all it replaces then.
    cfg["ledger"] = {"path": str(tmp_path / "l.db"), "flush_interval": 0.05}
    cfg["request_log"] = {"log_content": "full"}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        said = e.value.response.text
        assert "Security-Token" in said, said  # the upstream's words reached the client, the token did not
        assert TOKEN not in said and KEY_ID not in said, said

        aclient = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as ae:
            await aclient.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        assert "Security-Token" in ae.value.response.text and TOKEN not in ae.value.response.text

        async with aiohttp.ClientSession() as s:
            await _wait_for(s, proxy.url + "/admin/requests?limit=5", 2)
            async with s.get(proxy.url + f"/admin/requests/{e.value.response.headers['x-request-id']}") as r:
                stored = await r.text()
    assert "Security-Token" in stored and TOKEN not in stored, stored
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in logged and SECRET not in logged
