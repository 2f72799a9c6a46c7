"""The request log as an exit: credentials a client pastes into a prompt (edgeroute's own
managed keys among them) never reach the stored content, and hostile query parameters get a
400 naming the parameter, never a 500."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

ADMIN = {"Authorization": "Bearer tok-admin-0123456789"}

# Shapes a user pastes into a chat ("why does this fail?"); every one is a live credential.
PASTED = {
    "slack": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe": "sk_live_51HabcdEFGHijklMNOPqrstuv",
    "hugging face": "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567",
    "xai": "xai-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",
    "groq": "gsk_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",
    "gitlab": "glpat-AbCdEfGhIjKlMnOpQrSt",
    "private key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0t\n"
    "-----END RSA PRIVATE KEY-----",
}


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url, headers=ADMIN) as r:
        return r.status, await r.json()


async def test_pasted_credentials_never_reach_the_stored_content(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()  # the mock quotes the prompt in its answer
    db = tmp_path / "log.db"
    cfg = simple_config({"a": up})
    cfg |= {
        "keys": {"root": {"token": ADMIN["Authorization"][7:], "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(db), "flush_interval": 0.05},
        "request_log": {"log_content": "full"},  # `full` too replaces credentials
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/keys", json={"name": "app"}, headers=ADMIN) as r:
            assert r.status == 201
            managed = (await r.json())["secret"]
        secrets = PASTED | {"managed key": managed}
        # The mock quotes the first six words: the answer carries the first six credentials.
        prompt = " ".join([managed, *PASTED.values()]) + "\nMy setup fails with these"
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=managed, max_retries=0)
        msgs: Any = [{"role": "user", "content": prompt}]
        answer = await client.chat.completions.with_raw_response.create(model="m", messages=msgs)
        assert managed in (answer.parse().choices[0].message.content or "")  # the upstream did quote it
        stream = await client.chat.completions.create(model="m", messages=msgs, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert managed in streamed
        await client.close()
        deadline = time.monotonic() + 10
        while (page := (await _get(s, proxy.url + "/admin/requests"))[1])["data"] and len(page["data"]) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        for summary in page["data"]:
            status, one = await _get(s, proxy.url + f"/admin/requests/{summary['id']}")
            assert status == 200
            stored = one["content"]["request"] + one["content"]["response"]
            assert "[REDACTED]" in stored and "My setup fails" in stored
            assert [name for name, value in secrets.items() if _tail(value) in stored] == []
    # Nor the database's bytes (the request log's rows and any other table beside them).
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("log.db*"))  # noqa: ASYNC240 (the proxy has stopped)
    assert b"My setup fails" in raw
    assert [name for name, value in secrets.items() if _tail(value).encode() in raw] == []


def _tail(secret: str) -> str:
    """The part of a credential no redaction marker or ordinary text contains."""
    return max(secret.split("\n"), key=len)[-16:]


async def test_hostile_query_parameters_are_a_400_naming_the_parameter(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "log.db"), "flush_interval": 0.05})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()
        # "²" and "٣" pass `str.isdigit` / `\d`; a thousand nines overflow a float to infinity.
        for path, param in (
            ("/admin/requests?limit=%C2%B2", "limit"),
            ("/admin/stats?bucket=%C2%B2", "bucket"),
            ("/admin/requests?status=%D9%A3", "status"),
            ("/admin/requests?since=%D9%A3d", "since"),
        ):
            status, body = await _get(s, proxy.url + path)
            assert (status, body["error"]["param"]) == (400, param), path
        # A duration longer than the epoch is old means from the start, not a 500.
        huge = "9" * 400 + "d"
        deadline = time.monotonic() + 10
        while not (await _get(s, proxy.url + f"/admin/requests?since={huge}"))[1]["data"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        status, stats = await _get(s, proxy.url + f"/admin/stats?since={huge}")
        assert status == 200 and stats["since"] == 0
