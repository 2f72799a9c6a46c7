"""An upstream quoting the credentials it was sent in another form than the plain one: glued
to its own words (`token<key>was`, `key_<key>_x`, `x-<key>`), URL-encoded (`%2B` for `+`), inside
an `sk-proj-` shape, or cut mid-key by the message's length limit. Known secrets were replaced
only verbatim as whole tokens, so a shapeless provider key (a self-hosted server's) reached the
client (an error body, a stream's `attempts`, a mid-stream error event) and the log whole.

Credentials the config holds outside `api_key` were never known at all: a provider's `headers`
(`X-Custom-Auth`, Azure API Management's `Ocp-Apim-Subscription-Key`; one given as a `file:`
reference was even sent as the reference's text, never read) and the query of its
`options.chat_path` / `health_check.path` (`?code=` of Azure Functions): an upstream quoting its
request's headers or URL handed them to the tenant, and a viewer read the query's key in the config.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute import redact
from edgeroute.state import STATE
from tests.conftest import ServeRoutes, eventually
from tests.security.governed import ROOT, call, config_views
from tests.test_cost_support import cost_proxy

KEY = "Zq8vT2mN5pL1+xR7/wK3yH9cF4=vQ"  # shapeless, as a self-hosted or custom provider's key is
HEADER_KEY = "HeaderKEYsecret55555abc"
APIM_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CODE = "AzFnKEYsecret0123456789"  # an Azure Functions key in the chat path's query
HEALTH = "HealthKEYsecret987654"  # API Management's key parameter in the probe's path
GATEWAY = "GatewayTOKENref0123456789"  # a header given by reference (`file:`)
VAULT = "hvs.CAESIJabcdefghijklmnopqrstuvwxyz0123"
VIEWER = "tok-viewer-echo-0123456789"
USER: Any = [{"role": "user", "content": "hi"}]
CONTENT = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x"}


def _glued(key: str) -> str:
    return (
        f"Incorrect API key provided: token{key}was; key_{key}_x; x-{key}; {key}-x; {key}3D; "
        f"as sent: {quote(key, safe='')} {quote_plus(key)}; sk-proj-{key}"
    )


def _quote(request: web.Request, what: str) -> str:
    """What the hostile upstream says about the request, as the prompt asks."""
    bearer = request.headers.get("Authorization", "")[7:]
    if what == "headers":
        return "Bad request. Headers received: " + "; ".join(f"{k}: {v}" for k, v in request.headers.items())
    if what == "url":
        return f"No route for POST {request.path_qs}"
    if what == "long":  # no separator in the 256 characters before the 500-character cut
        return "x" * 480 + "/" + bearer + "/usage"
    return _glued(bearer)


async def _hostile(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    what, _, status = str(body["messages"][-1]["content"]).partition(":")
    message = _quote(request, what)
    if status == "midstream":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        delta = {"index": 0, "delta": {"role": "assistant", "content": "partial"}, "finish_reason": None}
        await resp.write(b"data: " + orjson.dumps({**CONTENT, "choices": [delta]}) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error"}}) + b"\n\n")
        await resp.write_eof()
        return resp
    err = {"error": {"message": message, "type": "invalid_request_error"}}
    return web.json_response(err, status=int(status or 400))


async def _config(serve_routes: ServeRoutes, tmp_path: Path) -> dict[str, Any]:
    up = await serve_routes(web.post("/{tail:.*}", _hostile))
    key = tmp_path / "provider-key"
    key.write_text(KEY + "\n")
    (tmp_path / "gateway-token").write_text(GATEWAY + "\n")
    provider = {
        "base_url": up.url + "/v1",
        "api_key": f"file:{key}",
        "headers": {
            "X-Custom-Auth": HEADER_KEY,
            "Ocp-Apim-Subscription-Key": APIM_KEY,
            "X-Gateway-Token": f"file:{tmp_path / 'gateway-token'}",
        },
        "options": {"chat_path": f"/chat/completions?code={CODE}"},
        "health_check": {"interval": 3600, "path": f"/models?subscription-key={HEALTH}"},
    }
    return {
        "providers": {"p": provider},
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
        "retry": {"base_ms": 1, "max_ms": 2},
        "keys": {"root": {"token": ROOT, "role": "admin"}, "viewer": {"token": VIEWER, "role": "viewer"}},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }


def _leaked(text: str) -> list[str]:
    """The secrets (or a head of one, 8 characters and more) found in `text`."""
    found = [s for s in (KEY, HEADER_KEY, APIM_KEY, CODE, HEALTH, GATEWAY) if s in text]
    return found + [f"{KEY[:8]}…" for form in (KEY, quote(KEY, safe="")) if form[:8] in text]


async def _error_text(url: str, prompt: str, stream: bool = False) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ROOT, max_retries=0)
    try:
        with pytest.raises(openai.APIError) as err:
            got = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], stream=stream
            )
            if stream:
                async for _ in got:  # type: ignore[union-attr]
                    pass
        response = getattr(err.value, "response", None)
        return str(err.value) + (response.text if response is not None else "")
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("prompt", "stream", "said"),
    [
        ("glued:400", False, "Incorrect API key provided"),  # the 400 relayed
        ("glued:500", True, "Incorrect API key provided"),  # a stream's 502, the attempts quoting it
        ("glued:midstream", True, "Incorrect API key provided"),  # an error event after content
        ("long:400", False, "characters cut"),  # cut mid-key by the upstream message's limit
        ("headers:400", False, "Headers received"),  # the provider's own credential headers quoted
        ("url:400", False, "No route for POST"),  # the chat path's `?code=` quoted
    ],
)
async def test_an_upstream_quoting_a_credential_in_another_form_gives_none_of_it_to_the_tenant(
    serve_routes: ServeRoutes, tmp_path: Path, caplog: pytest.LogCaptureFixture, prompt: str, stream: bool, said: str
) -> None:
    caplog.set_level(logging.INFO)
    async with cost_proxy(await _config(serve_routes, tmp_path)) as proxy:
        text = await _error_text(proxy.url, prompt, stream)
    assert said in text, text  # the upstream's words reached the tenant
    assert not _leaked(text) and "gateway-token" not in text, text
    if prompt.startswith("headers"):  # the reference was read (its value sent), then kept from the tenant
        assert "X-Gateway-Token: [REDACTED]" in text, text
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("edgeroute"))
    assert not _leaked(logged), logged


async def test_a_credential_in_a_providers_paths_is_masked_for_viewers_and_stored_as_a_hash(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    cfg = await _config(serve_routes, tmp_path)
    # A command given with a credential of its own (a Vault token): references are shown, that is not.
    command = f'exec:sh -c "echo ExecProviderKEY0123456789" X-Vault-Token: {VAULT}'
    cfg["providers"]["q"] = {"base_url": "https://other.example/v1", "api_key": command}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, drained = await call(s, "PATCH", proxy.url + "/admin/deployments/d", ROOT, {"weight": 3})
        assert status == 200, drained  # version 2
        for path, text in (await config_views(s, proxy.url, VIEWER)).items():
            assert not _leaked(text) and VAULT not in text, (path, text)
        status, shown = await call(s, "GET", proxy.url + "/admin/config", VIEWER)
        p = shown["config"]["providers"]["p"]
        assert p["options"]["chat_path"] == p["health_check"]["path"] == "****"
        assert shown["config"]["providers"]["q"]["api_key"].endswith("X-Vault-Token: [REDACTED]")
        with sqlite3.connect(tmp_path / "gov.db") as db:
            stored = [row for (row,) in db.execute("SELECT body FROM gov_config_versions")]
        assert stored and not [text for text in stored if _leaked(text)]
        status, rolled = await call(s, "POST", proxy.url + "/admin/config/rollback", ROOT, {"version": 1})
        assert status == 200, rolled  # a rollback takes the path back from the running config
        assert CODE in proxy.app[STATE].live.config.providers["p"].options["chat_path"]


def test_a_header_reference_that_does_not_resolve_is_a_config_error_naming_the_header(tmp_path: Path) -> None:
    cfg = {
        "providers": {"p": {"base_url": "https://up.example/v1", "headers": {"X-Key": f"file:{tmp_path / 'none'}"}}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.parse(cfg, "edge.yaml")
    (error,) = e.value.errors
    assert "providers.p.headers.X-Key" in error and "cannot read secret file" in error, error


@pytest.mark.parametrize(
    "quoted",
    [
        "Ocp-Apim-Subscription-Key: 9a8b7c6d5e4f3a2b1c0d",
        "X-Auth-Token: 9a8b7c6d5e4f3a2b1c0d",
        "Helicone-Auth: 9a8b7c6d5e4f3a2b1c0d",
        "X-Vault-Token: 9a8b7c6d5e4f3a2b1c0d",
        "the token hvs.CAESIJ9a8b7c6d5e4f3a2b1c0d was",
        "GET /api?subscription-key=9a8b7c6d5e4f3a2b1c0d&x=1",
    ],
)
def test_credential_headers_and_parameters_of_any_name_are_a_shape(quoted: str) -> None:
    """Whoever's they are (a gateway's, a vault's): an upstream quoting them hands over a credential."""
    assert "9a8b7c6d5e4f3a2b1c0d" not in redact.outbound(quoted)


async def test_the_request_log_keeps_the_upstreams_words_not_the_glued_key(
    serve_routes: ServeRoutes, tmp_path: Path
) -> None:
    """With `log_content: full` an admin reads the upstream's message in the attempts: the key glued in it is gone."""
    cfg = await _config(serve_routes, tmp_path)
    cfg["ledger"]["flush_interval"] = 0.05
    cfg["request_log"] = {"log_content": "full"}
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
        try:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "glued:500"}])
        finally:
            await client.close()
        request_id = e.value.response.headers["x-request-id"]

        async def stored() -> str | None:
            status, body = await call(s, "GET", proxy.url + f"/admin/requests/{request_id}", ROOT)
            return orjson.dumps(body).decode() if status == 200 else None

        text = await eventually(stored, "the request logged", within=10)
    assert "Incorrect API key provided" in text, text
    assert not _leaked(text), text
