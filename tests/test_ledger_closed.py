"""`ledger.on_unavailable: closed`: while the ledger cannot write, a server that prefers not
to spend money it cannot record refuses new requests, and takes them again once it writes.

By default (`open`) serving goes on and the spend waits in memory, all of it lost to a
`kill -9`. The write is made to fail by a trigger on the real SQLite ledger, put there by the
test (an error of the store, retried, as a full disk's); `edgeroute serve` runs as a real process, the openai
SDK is the client."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import eventually, simple_config
from tests.governance_support import instances, ledger_sql, write_config

# An error of the store, not of the row (as a full disk's): the ledger keeps the records and retries.
_WRITES_FAIL = "CREATE TRIGGER spend_down BEFORE INSERT ON spend BEGIN INSERT INTO store_unavailable VALUES (1); END"


async def _chat(url: str) -> openai.APIStatusError | None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            return e
    return None


async def _answered_id(url: str) -> str:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
    return raw.headers["x-request-id"]


async def _post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        return r.status, await r.json()


async def _unwritten(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        body = await r.json()
    return int(body.get("ledger", {}).get("unwritten_records", 0))


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_ledger_that_cannot_write_refuses_new_requests_only_when_closed(
    start_upstream: Any, tmp_path: Path, mode: str
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["ledger"] = {"flush_interval": 0.05, "on_unavailable": mode, "max_unwritten": 2}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 1)
    (server,) = await asyncio.to_thread(cm.__enter__)
    try:
        rated = await _answered_id(server.url)

        async def first_written() -> bool:
            return await asyncio.to_thread(_rows, tmp_path) == 1

        await eventually(first_written, "the first answer's spend written", within=10)
        await asyncio.to_thread(ledger_sql, tmp_path, _WRITES_FAIL)
        for n in range(1, 4):  # up to the bound (2 unwritten), answered whatever the mode
            assert await _chat(server.url) is None
            if n <= 2:

                async def held(n: int = n) -> bool:
                    return await _unwritten(server.url) >= n

                await eventually(held, f"{n} records unwritten", within=10)
        # 3 unwritten now, over the bound.
        refused = await _chat(server.url)
        if mode == "open":
            assert refused is None
        else:
            assert refused is not None and refused.status_code == 503, refused
            assert refused.code == "ledger_unavailable" and "ledger.on_unavailable is closed" in refused.message
            assert refused.response.headers["Retry-After"] == "5"
        # What spends nothing is served in either mode: a feedback score (stored once the ledger
        # writes again), a routing explanation. Feedback was refused with the spend.
        assert await _post(server.url, "/v1/feedback", {"request_id": rated, "score": 0.75}) == (
            200, {"request_id": rated, "task": None, "route": "m", "accepted": True, "stored": True},
        )  # fmt: skip
        status, explained = await _post(
            server.url, "/v1/route/explain", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 200 and explained["route"] == "m", explained
        await asyncio.to_thread(ledger_sql, tmp_path, "DROP TRIGGER spend_down")

        async def written() -> bool:
            async with aiohttp.ClientSession() as s, s.get(server.url + "/readyz") as r:
                return r.status == 200

        await eventually(written, "the ledger writing again", within=10)
        assert await _chat(server.url) is None
    finally:
        cm.__exit__(None, None, None)
    assert _rows(tmp_path) == (6 if mode == "open" else 5)  # everything answered is recorded
    assert _rows(tmp_path, "SELECT request_id, score FROM feedback") == [(rated, 0.75)]


async def test_feedback_while_the_request_log_cannot_be_read_is_a_clear_503(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Feedback finds its request in the request log: a log that cannot be read (the database
    down or damaged) is a 503 that says so, not a 500 (an unhandled error, in the log)."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["ledger"] = {"flush_interval": 0.05, "on_unavailable": "closed"}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 1)
    (server,) = await asyncio.to_thread(cm.__enter__)
    try:
        rated = await _answered_id(server.url)
        await asyncio.to_thread(ledger_sql, tmp_path, "ALTER TABLE requests RENAME TO requests_gone")
        status, body = await _post(server.url, "/v1/feedback", {"request_id": rated, "score": 1})
    finally:
        cm.__exit__(None, None, None)
    assert status == 503 and body["error"]["code"] == "request_log_unavailable", body
    assert "request log cannot be read" in body["error"]["message"]
    assert "unhandled error on POST /v1/feedback" not in (tmp_path / "edgeroute-0.log").read_text()


def _rows(tmp: Path, sql: str = "SELECT count(*) FROM spend") -> Any:
    conn = sqlite3.connect(tmp / "edgeroute-ledger.db", timeout=10)
    try:
        rows = conn.execute(sql).fetchall()
        return int(rows[0][0]) if sql.startswith("SELECT count") else rows
    finally:
        conn.close()


async def _every_spending_call(base_url: str) -> dict[str, int | None]:
    """Each endpoint that calls an upstream (and so spends), through the official SDKs: the
    status of its refusal (None: answered)."""
    got: dict[str, int | None] = {}
    say = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        calls: dict[str, Any] = {
            "chat": lambda: client.chat.completions.create(model="m", messages=say),
            "chat stream": lambda: client.chat.completions.create(model="m", messages=say, stream=True),
            "embeddings": lambda: client.embeddings.create(model="m", input="hi"),
            "completions": lambda: client.completions.create(model="m", prompt="hi", max_tokens=5),
            "responses": lambda: client.responses.create(model="m", input="hi"),
        }
        for name, make in calls.items():
            try:
                out = await make()
                if isinstance(out, openai.AsyncStream):
                    async for _ in out:
                        pass
                got[name] = None
            except openai.APIStatusError as e:
                assert e.code == "ledger_unavailable", (name, e)
                got[name] = e.status_code
    return got


async def test_closed_refuses_every_spending_endpoint_with_or_without_the_v1_prefix(
    start_upstream: Any, tmp_path: Path
) -> None:
    """An SDK pointed at the server's root (`base_url` without `/v1`, which edgeroute serves
    as well) must not be a way around `on_unavailable: closed`; what cannot spend
    (`/v1/messages/count_tokens`, `/v1/route/explain`) is answered meanwhile."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["ledger"] = {"flush_interval": 0.05, "on_unavailable": "closed", "max_unwritten": 0}
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    cm = instances(path, 1)
    (server,) = await asyncio.to_thread(cm.__enter__)
    try:
        assert await _chat(server.url) is None

        async def first_written() -> bool:
            return await asyncio.to_thread(_rows, tmp_path) == 1

        await eventually(first_written, "the first answer's spend written", within=10)
        await asyncio.to_thread(ledger_sql, tmp_path, _WRITES_FAIL)
        assert await _chat(server.url) is None

        async def held() -> bool:
            return await _unwritten(server.url) >= 1

        await eventually(held, "1 record unwritten", within=10)
        for base in (server.url + "/v1", server.url):
            refused = await _every_spending_call(base)
            assert refused == dict.fromkeys(refused, 503), (base, refused)
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0) as claude:
            with pytest.raises(anthropic.APIStatusError) as e:
                await claude.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
            assert e.value.status_code == 503 and "ledger.on_unavailable is closed" in e.value.message
            counted = await claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])
            assert counted.input_tokens > 0
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(server.url + "/v1/route/explain", json=body) as r:
                assert r.status == 200 and (await r.json())["route"] == "m"
            async with s.post(server.url + "/v1/feedback", json={"request_id": "req_none", "score": 1}) as r:
                assert r.status == 404  # answered (not enabled here), not refused
        await asyncio.to_thread(ledger_sql, tmp_path, "DROP TRIGGER spend_down")

        async def written() -> bool:
            async with aiohttp.ClientSession() as s, s.get(server.url + "/readyz") as r:
                return r.status == 200

        await eventually(written, "the ledger writing again", within=10)
        assert await _every_spending_call(server.url) == dict.fromkeys(
            ("chat", "chat stream", "embeddings", "completions", "responses")
        )
    finally:
        cm.__exit__(None, None, None)
    assert _rows(tmp_path) == 2 + 5  # everything answered is recorded, nothing refused is
