"""A managed key's open streams end with it: revoked, expired, or ended with its maker.

A revoked key's stream ran to its end (minutes of a long answer, for a key revoked because it
leaked). Now each open stream of the key is cut at its next events after the key is seen ended
(within a key poll), with an error event in the client's format naming why, and what the upstream
produced up to then is priced as any cut stream's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from tests.conftest import eventually, routes_upstream, simple_config
from tests.dispatch_support import chunk, sse_response
from tests.governance_support import call
from tests.test_cost_support import CostProxy, cost_proxy

ROOT = "tok-root-0123456789"
WORDS = 400  # at 20 ms a chunk: 8 s of stream, far past when the key ends
ASK: Any = [{"role": "user", "content": "tell me a long story"}]


@pytest.fixture
async def proxy(start_upstream: Any, tmp_path: Path) -> AsyncIterator[CostProxy]:
    cfg = simple_config({"a": await start_upstream(chunk_interval=0.02, reply_words=WORDS)})
    cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.1}
    cfg["ledger"] = {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05}
    async with cost_proxy(cfg) as p:
        yield p


async def _key(proxy: CostProxy, **fields: Any) -> dict[str, Any]:
    status, made = await call("POST", proxy.url + "/admin/keys", ROOT, json={"role": "service", **fields})
    assert status == 201, made
    return made


async def _logged(proxy: CostProxy, key_id: str) -> dict[str, Any]:
    """The request's row in the request log, once written."""

    async def row() -> dict[str, Any] | None:
        async with (
            aiohttp.ClientSession() as s,
            s.get(proxy.url + "/admin/requests", headers={"Authorization": f"Bearer {ROOT}"}) as r,
        ):
            rows = (await r.json())["data"]
        return next((x for x in rows if x.get("key") == key_id), None)

    return await eventually(row, "the cut request logged")


def _assert_cut_and_priced(row: dict[str, Any], code: str) -> None:
    assert (row["outcome"], row["error_class"]) == ("stream_interrupted", code), row
    assert row["cost_usd"] > 0 and 0 < row["completion_tokens"] < WORDS, row


async def test_a_revoked_keys_openai_stream_is_cut_with_an_error_chunk(proxy: CostProxy) -> None:
    made = await _key(proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=made["secret"], max_retries=0)
    got, started = 0, time.monotonic()
    try:
        stream = await client.chat.completions.create(model="m", messages=ASK, stream=True)
        with pytest.raises(openai.APIError) as raised:
            async for _ in stream:
                got += 1
                if got == 5:
                    status, _ = await call("DELETE", proxy.url + f"/admin/keys/{made['id']}", ROOT)
                    assert status == 200
    finally:
        await client.close()
    assert "has been revoked" in raised.value.message and made["id"] in raised.value.message
    assert raised.value.code == "key_revoked", raised.value.body
    assert got < WORDS / 2 and time.monotonic() - started < 5, got
    _assert_cut_and_priced(await _logged(proxy, made["id"]), "key_revoked")


async def test_an_expiring_keys_anthropic_stream_is_cut_with_an_error_event(proxy: CostProxy) -> None:
    made = await _key(proxy, expires_at=time.time() + 1.5)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=made["secret"], max_retries=0)
    got = ""
    try:
        with pytest.raises(anthropic.APIStatusError, match="has expired"):
            async with client.messages.stream(model="m", max_tokens=4000, messages=ASK) as st:
                async for text in st.text_stream:
                    got += text
    finally:
        await client.close()
    assert 0 < len(got.split()) < WORDS, got
    _assert_cut_and_priced(await _logged(proxy, made["id"]), "key_expired")


async def test_a_key_made_by_a_revoked_key_has_its_stream_cut(proxy: CostProxy) -> None:
    maker = await _key(proxy, role="admin")
    status, child = await call("POST", proxy.url + "/admin/keys", maker["secret"], json={"role": "service"})
    assert status == 201, child
    other = await _key(proxy)  # another key's stream goes on to its end
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=child["secret"], max_retries=0)
    bystander = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=other["secret"], max_retries=0)
    try:
        untouched = await bystander.chat.completions.create(model="m", messages=ASK, stream=True)
        stream = await client.chat.completions.create(model="m", messages=ASK, stream=True)
        revoked = False
        with pytest.raises(openai.APIError, match=f"made by key {maker['id']}, which has been revoked"):
            async for _ in stream:
                if not revoked:
                    assert (await call("DELETE", proxy.url + f"/admin/keys/{maker['id']}", ROOT))[0] == 200
                    revoked = True
        ends = [c.choices[0].finish_reason async for c in untouched if c.choices]
        assert ends[-1] == "stop" and len(ends) > WORDS / 2, ends[-3:]
    finally:
        await client.close()
        await bystander.close()


async def test_a_key_revoked_while_its_stream_waits_for_the_first_byte_is_cut(tmp_path: Path) -> None:
    """red8 G1: revoked after the request was let in but before the upstream answered (a
    reasoning model's time to first token, a queue), the key's stream was never cut: the watch
    began counting ends when the relay started, after this one was counted."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow_start(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()  # the headers wait until the key is revoked and seen so
        r = await sse_response(request)
        for _ in range(WORDS):
            await r.write(chunk("word "))
            await asyncio.sleep(0.01)
        await r.write(b"data: [DONE]\n\n")
        return r

    async with routes_upstream(web.post("/v1/chat/completions", slow_start)) as up:
        cfg = simple_config({"a": SimpleNamespace(base_url=up.url + "/v1")})
        cfg["keys"] = {"root": {"token": ROOT, "role": "admin"}}
        cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.1}
        cfg["ledger"] = {"path": str(tmp_path / "gov.db"), "flush_interval": 0.05}
        async with cost_proxy(cfg) as proxy:
            made = await _key(proxy)
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=made["secret"], max_retries=0)
            try:
                opening = asyncio.create_task(client.chat.completions.create(model="m", messages=ASK, stream=True))
                await asyncio.wait_for(arrived.wait(), 10)
                assert (await call("DELETE", proxy.url + f"/admin/keys/{made['id']}", ROOT))[0] == 200

                async def refused() -> bool:  # the proxy's view has the key ended
                    status, _ = await call("GET", proxy.url + "/v1/models", made["secret"])
                    return status == 401

                await eventually(refused, "the revoked key refused")
                release.set()
                stream = await opening
                got = 0
                with pytest.raises(openai.APIError) as raised:
                    async for _ in stream:
                        got += 1
            finally:
                release.set()
                await client.close()
            assert raised.value.code == "key_revoked" and made["id"] in raised.value.message, raised.value.body
            assert got < WORDS / 2, got
