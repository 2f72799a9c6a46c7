"""Each fault mode of edgeroute.bench.faults, observed by a plain aiohttp client (and the admin API)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from edgeroute.bench.faults import MODES, FaultUpstream, parse_fault_header

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}


@pytest.fixture
async def up() -> AsyncIterator[FaultUpstream]:
    server = FaultUpstream()
    await server.start()
    yield server
    await server.stop()


def _post(
    s: aiohttp.ClientSession, up: FaultUpstream, body: Mapping[str, Any], fault: str | None = None, timeout: float = 5.0
) -> aiohttp.client._RequestContextManager:
    headers = {"x-fault": fault} if fault else {}
    return s.post(
        up.url + "/chat/completions",
        data=orjson.dumps(body),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def test_ok_json_and_stream(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with _post(s, up, BODY) as r:
            assert r.status == 200
            obj = await r.json()
            assert obj["object"] == "chat.completion" and obj["choices"][0]["finish_reason"] == "stop"
        async with _post(s, up, STREAM) as r:
            text = await r.text()
            assert r.headers["Content-Type"] == "text/event-stream"
            assert text.endswith("data: [DONE]\n\n")
    assert up.requests == 2 and up.by_mode == {"ok": 2}


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_status_modes(up: FaultUpstream, status: int) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, BODY, str(status)) as r:
        assert r.status == status
        assert (await r.json())["error"]["type"] == "server_error"


async def test_429_with_retry_after(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, BODY, "429 retry_after=7") as r:
        assert r.status == 429 and r.headers["Retry-After"] == "7"


async def test_hang_before_headers(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with _post(s, up, BODY, "hang", timeout=0.3):
                pass


async def test_stall_mid_stream(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, STREAM, "stall after=1") as r:
        assert r.status == 200
        got = b""
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.4):
                while True:
                    chunk = await r.content.readany()
                    if not chunk:
                        break
                    got += chunk
        assert got.count(b"data: ") == 2  # the role chunk and one content chunk, then silence


async def test_reset_mid_stream(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, STREAM, "reset after=2") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_malformed_json(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with _post(s, up, BODY, "malformed") as r:
            assert r.status == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(await r.read())
        async with _post(s, up, STREAM, "malformed") as r:
            first = (await r.text()).split("\n\n")[0]
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(first.removeprefix("data: "))


async def test_error_event_only(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, STREAM, "error_event") as r:
        assert r.status == 200
        events = [e for e in (await r.text()).split("\n\n") if e]
        assert len(events) == 1 and "error" in orjson.loads(events[0].removeprefix("data: "))


async def test_stream_without_done(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s, _post(s, up, STREAM, "no_done") as r:
        text = await r.text()
        assert r.status == 200 and "[DONE]" not in text and '"finish_reason":"stop"' in text


async def test_refuse_then_recover(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with _post(s, up, BODY) as r:
            assert r.status == 200
        up.set_mode("refuse", seconds=0.3)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with _post(s, up, BODY):
                pass
        await asyncio.sleep(0.45)
        async with _post(s, up, BODY) as r:
            assert r.status == 200


async def test_phases_by_count_and_admin_api(up: FaultUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(up.url.removesuffix("/v1") + "/_fault", json={"mode": "503", "count": 2}) as r:
            assert (await r.json())["mode"] == "503"
        statuses = []
        for _ in range(3):
            async with _post(s, up, BODY) as r:
                statuses.append(r.status)
        assert statuses == [503, 503, 200]
        up.set_mode("429", count=1)
        up.push("502", count=1)
        for want in (429, 502, 200):
            async with _post(s, up, BODY) as r:
                assert r.status == want
        async with s.post(up.url.removesuffix("/v1") + "/_fault", json={"mode": "refuse"}) as r:
            assert r.status == 200 and (await r.json())["listening"] is False
        up.clear()
        await up.settled()
        async with s.get(up.url.removesuffix("/v1") + "/_fault") as r:
            state = await r.json()
        assert state["listening"] is True and state["requests"] == 6 and state["by_mode"]["503"] == 2


async def test_slow_and_default_mode() -> None:
    up = FaultUpstream(default="502")
    await up.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with _post(s, up, BODY) as r:
                assert r.status == 502
            async with _post(s, up, BODY, "slow delay_ms=10") as r:
                assert r.status == 200
    finally:
        await up.stop()


def test_threaded_and_header_parsing() -> None:
    assert parse_fault_header("reset after=3 delay_s=0.5") == ("reset", {"after": 3, "delay_s": 0.5})
    assert set(MODES) >= {"refuse", "hang", "stall", "reset", "malformed", "error_event", "no_done"}
    with FaultUpstream.threaded() as bg:
        bg.call_soon(lambda: bg.server.set_mode("503"))

        async def get() -> int:
            async with aiohttp.ClientSession() as s, _post(s, bg.server, BODY) as r:
                return r.status

        assert asyncio.run(get()) == 503
        assert bg.server.requests == 1
