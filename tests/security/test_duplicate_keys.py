"""A request body that repeats a key in one object is refused, on every endpoint, before any call.

JSON leaves a repeated key to the reader: edgeroute's checks keep the last value, an upstream
may keep the first. `"max_tokens": 1, "max_tokens": 100000` reserved a budget for one token
and was served by a provider reading 100,000; `"file_id": "file-x", "file_id": ""` in a
content part passed the provider-file check and named the file to such a provider. Each is now
a 400 in the API's own error format naming the key's path. The upstream is the bundled mock,
which records what reaches it; the bodies are written by hand (no SDK sends a key twice), and
the official SDK shows that ordinary requests, the same key in different objects, still pass."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute import _core
from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

TOKEN = "sk-tenant-1"
_USER = '{"role": "user", "content": "hello there"}'


async def _post(url: str, path: str, raw: str) -> tuple[int, Any]:
    hdrs = {"Authorization": f"Bearer {TOKEN}", "x-api-key": TOKEN, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url + path, data=raw, headers=hdrs) as r:
        return r.status, await r.json()


@pytest.fixture
async def proxied(start_upstream: Any, tmp_path: Path) -> Any:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "l.db")}, keys={"t": {"token": TOKEN}})
    cfg["providers"]["a"]["kind"] = "openai"
    async with cost_proxy(cfg) as proxy:
        yield proxy, up


@pytest.mark.parametrize(
    ("path", "raw", "where"),
    [
        (
            "/v1/chat/completions",
            f'{{"model": "m", "max_tokens": 1, "messages": [{_USER}], "max_tokens": 100000}}',
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            '{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "read it"},'
            ' {"type": "file", "file": {"file_id": "file-secret", "file_id": ""}}]}]}',
            "messages[0].content[1].file.file_id",
        ),
        (
            "/v1/chat/completions",
            f'{{"model": "m", "messages": [{_USER}], "user": "alice", "\\u0075ser": "bob"}}',
            "user",
        ),
        ("/v1/responses", '{"model": "m", "input": "hi", "model": "gpt-4o"}', "model"),
        ("/v1/completions", '{"model": "m", "prompt": "hi", "max_tokens": 1, "max_tokens": 9000}', "max_tokens"),
    ],
)
async def test_an_openai_body_repeating_a_key_is_a_400_naming_it(proxied: Any, path: str, raw: str, where: str) -> None:
    proxy, up = proxied
    status, body = await _post(proxy.url, path, raw)
    assert status == 400, body
    err = body["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "duplicate_key"
    assert err["param"] == where and f"'{where}'" in err["message"]
    assert up.options.requests == []  # nothing reached the provider


async def test_an_anthropic_body_repeating_a_key_is_anthropics_400(proxied: Any) -> None:
    proxy, up = proxied
    raw = f'{{"model": "m", "max_tokens": 1, "messages": [{_USER}], "max_tokens": 64000}}'
    status, body = await _post(proxy.url, "/v1/messages", raw)
    assert status == 400, body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "'max_tokens'" in body["error"]["message"]
    assert up.options.requests == []


async def test_the_same_key_in_different_objects_is_served(proxied: Any) -> None:
    proxy, up = proxied
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=TOKEN, max_retries=0) as client:
        done = await client.chat.completions.create(
            model="m",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
            ],
            max_tokens=50,
            metadata={"role": "user", "content": "the same names, another object"},
        )
    assert done.choices[0].message.content
    assert len(up.options.requests) == 1


async def test_a_large_body_is_searched_off_the_event_loop(proxied: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large body's keys are searched in a worker thread (a flat object of a million short
    keys took the event loop for tens of milliseconds), with the same answers: a key repeated
    at its end is still found, a body without one still served."""
    proxy, up = proxied
    scanned: list[str] = []
    real = asyncio.to_thread

    async def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        scanned.append(getattr(func, "__name__", ""))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    many = ", ".join(f'"k{i}": {i}' for i in range(20_000))  # ~240 KB of metadata-like keys
    status, body = await _post(
        proxy.url, "/v1/chat/completions", f'{{"model": "m", "messages": [{_USER}], "x": {{{many}, "k7": 0}}}}'
    )
    assert status == 400 and body["error"]["param"] == "x.k7", body
    assert "_scans" in scanned  # the depth and repeated-key scans, in one worker thread call
    status, body = await _post(
        proxy.url, "/v1/chat/completions", f'{{"model": "m", "messages": [{_USER}], "x": {{{many}}}}}'
    )
    assert status == 200, body
    assert up.options.requests and scanned.count("_scans") == 2


async def test_a_body_sent_again_is_judged_by_its_own_bytes(proxied: Any) -> None:
    """Bodies found clean are remembered (a cache hit's body is compared, not scanned again):
    a body sent again is judged as the first time, one a key apart from a remembered clean
    body is scanned and refused, and a body remembered clean at one depth limit is not
    taken as clean at a lower one."""
    proxy, up = proxied
    clean = f'{{"model": "m", "max_tokens": 1, "messages": [{_USER}], "user": "alice"}}'
    twice = clean.replace('"user": "alice"', '"m\\u0061x_tokens": 9')
    for _ in range(2):
        status, body = await _post(proxy.url, "/v1/chat/completions", clean)
        assert status == 200, body
        status, body = await _post(proxy.url, "/v1/chat/completions", twice)
        assert status == 400 and body["error"]["param"] == "max_tokens", body
    assert len(up.options.requests) == 2
    deep = f'{{"model": "m", "messages": [{_USER}], "x": {"[" * 130}{"]" * 130}}}'.encode()
    for _ in range(2):
        assert _core.Router.body_faults(deep, 128) == (True, None)
        assert _core.Router.body_faults(deep, 200) == (False, None)  # remembered clean at 200
        assert _core.Router.body_faults(clean.encode(), 128) == (False, None)
        assert _core.Router.body_faults(twice.encode(), 128) == (False, "max_tokens")
