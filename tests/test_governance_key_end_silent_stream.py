"""A managed key's stream is cut when the key ends even while its upstream is silent.

The cut came at the upstream's next events: a reasoning model thinking between chunks (here
6 s apart) kept a revoked key's stream, and its upstream request, open for as long as it was
silent. Now the relay wakes when the key is seen ended (at once on the revoking instance,
within a key poll on another) and ends the stream with the error event, the upstream request
closed and what was relayed priced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream, simple_config
from tests.dispatch_support import chunk, sse_response
from tests.governance_support import call
from tests.test_cost_support import CostProxy, cost_proxy
from tests.test_governance_key_end_cuts_streams import ROOT, _key, _logged

GAP = 6.0  # seconds of silence between the upstream's chunks


class Silent:
    """An upstream that sends some words, then thinks for GAP s between chunks; it notes when
    its client (the proxy) closed the request."""

    def __init__(self) -> None:
        self.closed_at: float | None = None

    async def closed(self) -> bool:
        return self.closed_at is not None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        r = await sse_response(request)
        await r.write(chunk("Let me think about it. "))
        try:
            for word in ("Well", " then", "."):
                end = time.monotonic() + GAP
                while time.monotonic() < end:  # silent, watching for the proxy to hang up
                    if request.transport is None or request.transport.is_closing():
                        self.closed_at = time.monotonic()
                        return r
                    await asyncio.sleep(0.02)
                await r.write(chunk(word))
        except asyncio.CancelledError:  # aiohttp cancels a handler whose client hung up
            self.closed_at = time.monotonic()
            raise
        await r.write(b"data: [DONE]\n\n")
        return r


@pytest.fixture
async def silent(tmp_path: Path) -> AsyncIterator[tuple[CostProxy, Silent]]:
    up = Silent()
    async with routes_upstream(web.post("/v1/chat/completions", up.handle)) as server:
        cfg = simple_config({"a": SimpleNamespace(base_url=server.url + "/v1")})
        cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
        cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.1}
        cfg["ledger"] = {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05}
        async with cost_proxy(cfg) as proxy:
            yield proxy, up


async def _read_until_cut(proxy: CostProxy, secret: str, end: Any) -> tuple[openai.APIError, float, str]:
    """Streams with the OpenAI SDK; `end` (awaited after the first chunk) ends the key. The
    error the SDK raised, seconds from the end to the error, and the text read."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=secret, max_retries=0)
    ended_at: float | None = None
    text = ""
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "think hard"}], stream=True
        )
        with pytest.raises(openai.APIError) as raised:
            async for c in stream:
                text += (c.choices[0].delta.content or "") if c.choices else ""
                if ended_at is None:
                    await end()
                    ended_at = time.monotonic()
    finally:
        await client.close()
    assert ended_at is not None
    return raised.value, time.monotonic() - ended_at, text


async def test_a_revoked_keys_silent_stream_is_cut_at_once(silent: tuple[CostProxy, Silent]) -> None:
    proxy, up = silent
    made = await _key(proxy)

    async def revoke() -> None:
        assert (await call("DELETE", proxy.url + f"/admin/keys/{made['id']}", ROOT))[0] == 200

    error, took, text = await _read_until_cut(proxy, made["secret"], revoke)
    assert error.code == "key_revoked" and made["id"] in error.message, error.body
    assert took < 1.5, f"the error event came {took:.2f} s after the revocation (the upstream's next chunk)"
    assert text == "Let me think about it. "
    await eventually(up.closed, "the upstream request closed", within=3)
    row = await _logged(proxy, made["id"])
    assert (row["outcome"], row["error_class"]) == ("stream_interrupted", "key_revoked"), row
    assert row["completion_tokens"] > 0 and row["cost_usd"] > 0, row


async def test_an_expiring_keys_silent_stream_is_cut_within_a_poll(silent: tuple[CostProxy, Silent]) -> None:
    """Seen by the key poll (as a revocation on another instance is): within about a second."""
    proxy, up = silent
    made = await _key(proxy, expires_at=time.time() + 2.0)

    async def nothing() -> None:
        return None

    error, took, _ = await _read_until_cut(proxy, made["secret"], nothing)
    assert error.code == "key_expired", error.body
    assert took < 3.5, f"cut {took:.2f} s after the first chunk (expiry 2 s after the key was made)"
    await eventually(up.closed, "the upstream request closed", within=3)
    row = await _logged(proxy, made["id"])
    assert (row["outcome"], row["error_class"]) == ("stream_interrupted", "key_expired"), row
