"""The redaction set holds at most 4,096 values, and rotated ones stay in it on purpose (a
rotated key is still a secret). An `exec:` secret that prints a new token at each run (a Vault
dynamic secret, an OAuth token minted per call) adds one every `secrets_refresh`: after 4,096 of
them (about 34 hours at 30 s) the oldest values were dropped, and those were the config's own
secrets, still in use: a provider key quoted back by its upstream then reached the tenant. Each
refresh pass now marks every secret in use as current, so the bound drops superseded ones."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from edgeroute import redact, secrets
from tests.conftest import ServeRoutes
from tests.test_cost_support import cost_proxy

KEY = "Yw3kP9sL2qV8nR5tB7mX4cJ6static"  # the provider's key, resolved once at load
HEADER = "CustomAUTHstatic0123456789xyz"  # a credential header, a plain value of the config


@pytest.fixture
def known_values_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The churn below pushes every other test's values out of the process-wide set: put them back."""
    monkeypatch.setattr(secrets, "_keep_at", 0.0, raising=False)  # the passes below run on a clock of their own
    saved = dict(redact._KNOWN._values)
    try:
        yield
    finally:
        redact._KNOWN._values = saved
        redact._KNOWN.settle()


async def _quoting(request: web.Request) -> web.Response:
    await request.read()
    quoted = f"{request.headers.get('Authorization', '')[7:]} / {request.headers.get('X-Custom-Auth', '')}"
    return web.json_response({"error": {"message": f"Incorrect API key provided: {quoted}"}}, status=400)


async def test_secrets_in_use_stay_redacted_after_thousands_of_rotations_of_another(
    known_values_restored: None, serve_routes: ServeRoutes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _quoting))
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    cfg: dict[str, Any] = {
        "providers": {
            "p": {"base_url": up.url + "/v1", "api_key": f"file:{key}", "headers": {"X-Custom-Auth": HEADER}}
        },
        "deployments": {"d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1}}},
        "models": {"m": {"deployments": ["d"]}},
    }
    async with cost_proxy(cfg) as proxy:
        minted = secrets.Secret("ya29.initialTOKEN0000000", "exec:mint-token")
        # Only this test's secrets refreshed (earlier tests' files and commands are gone or slow).
        monkeypatch.setattr(secrets, "_live", {k: v for k, v in secrets._live.items() if str(tmp_path) in k})
        start = time.monotonic()
        for i in range(4200):  # the refresh passes of 35 hours, 30 s apart, each minting a new token
            minted._replace(f"ya29.a0AfB_{i:08d}shortlivedTOKEN")
            secrets.refresh(start + 30.0 * i)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        finally:
            await client.close()
    said = e.value.response.text
    assert "Incorrect API key provided" in said, said
    assert KEY not in said and HEADER not in said, said
    assert redact.text("ya29.a0AfB_00004199shortlivedTOKEN") == redact.MARKER  # the newest rotated ones too
