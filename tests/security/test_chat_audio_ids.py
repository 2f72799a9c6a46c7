"""A chat answer's spoken audio is named again only by the tenant it was made for.

OpenAI keeps a chat answer's audio under an id (`message.audio.id`, a stream's
`delta.audio.id`) in the provider account every tenant of the gateway shares; a later turn
sends `{"role": "assistant", "audio": {"id": ...}}` back and the model hears that audio again.
Another tenant naming the id heard the first tenant's answer. edgeroute now binds each audio
id it returns to the caller's team (or key) and answers any other caller OpenAI's 404, whether
the id exists or not. The official openai SDK is the client; the bundled OpenAI mock keeps
each spoken answer and replays it when its id is named, as OpenAI does."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream, simple_config
from tests.governance_support import instances, store_statements, write_config
from tests.test_cost_support import cost_proxy, require_redis

ALICE, ALICE_TOO, BOB = "sk-alice-1", "sk-alice-2", "sk-bob-1"
_KEYS = {
    "alice": {"token": ALICE, "team": "alice"},
    "alice2": {"token": ALICE_TOO, "team": "alice"},
    "bob": {"token": BOB, "team": "bob"},
}
_SPEAK: dict[str, Any] = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}


def _client(url: str, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)


async def _spoken(url: str, token: str, said: str, stream: bool) -> str:
    """The id of the audio answering `said`, as the SDK reads it (a stream's from its deltas)."""
    async with _client(url, token) as client:
        messages: Any = [{"role": "user", "content": said}]
        if not stream:
            done = await client.chat.completions.create(model="m", messages=messages, **_SPEAK)
            assert done.choices[0].message.audio is not None
            return done.choices[0].message.audio.id
        ids = set()
        async for chunk in await client.chat.completions.create(model="m", messages=messages, stream=True, **_SPEAK):
            audio: Any = getattr(chunk.choices[0].delta, "audio", None) if chunk.choices else None
            aid = (
                audio.get("id") if isinstance(audio, dict) else getattr(audio, "id", None)
            )  # as the SDK's version types it
            if aid is not None:
                ids.add(aid)
        assert len(ids) == 1
        return ids.pop()


async def _replayed(url: str, token: str, audio_id: str) -> str:
    """What the model says when the audio is sent back in an assistant turn."""
    async with _client(url, token) as client:
        messages: Any = [
            {"role": "user", "content": "say something"},
            {"role": "assistant", "audio": {"id": audio_id}},
            {"role": "user", "content": "what did you say?"},
        ]
        done = await client.chat.completions.create(model="m", messages=messages)
        return done.choices[0].message.content or ""


def _config(up: Any, ledger: dict[str, Any], keys: dict[str, Any] | None = _KEYS, **extra: Any) -> dict[str, Any]:
    cfg = simple_config({"a": up}, ledger=ledger, **extra)
    cfg["providers"]["a"]["kind"] = "openai"
    if keys is not None:
        cfg["keys"] = keys
    return cfg


@pytest.mark.parametrize("stream", [False, True])
async def test_another_tenant_cannot_replay_a_spoken_answer(start_upstream: Any, tmp_path: Path, stream: bool) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, {"path": str(tmp_path / "l.db")})) as proxy:
        aid = await _spoken(proxy.url, ALICE, "alpha-secret-77", stream)
        with pytest.raises(openai.NotFoundError) as refused:
            await _replayed(proxy.url, BOB, aid)
        body = refused.value.body
        assert isinstance(body, dict) and body["code"] == "audio_not_found"
        assert body["param"] == "messages[1].audio.id" and aid in body["message"]
        assert "alpha-secret" not in str(body)
        # Its own team (another key of it) hears it again.
        assert "alpha-secret-77" in await _replayed(proxy.url, ALICE_TOO, aid)
    named = [r for r in up.options.requests if any(m.get("audio") == {"id": aid} for m in r["body"]["messages"])]
    assert len(named) == 1, "Bob's request reached the provider"  # Alice's second key's only


async def test_an_audio_id_edgeroute_never_returned_is_refused_as_unknown(start_upstream: Any, tmp_path: Path) -> None:
    """Made at the provider directly (or by a tenant before this check): no one's."""
    up = await start_upstream()
    async with cost_proxy(_config(up, {"path": str(tmp_path / "l.db")})) as proxy:
        async with _client(up.base_url.removesuffix("/v1"), "key-a") as direct:  # the provider, not edgeroute
            done = await direct.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "bravo-secret"}], **_SPEAK
            )
        assert done.choices[0].message.audio is not None
        with pytest.raises(openai.NotFoundError):
            await _replayed(proxy.url, ALICE, done.choices[0].message.audio.id)


async def test_an_escaped_key_names_the_audio_all_the_same(start_upstream: Any, tmp_path: Path) -> None:
    """`"\\u0061udio"` is `"audio"` to every JSON parser: the body is read, not skipped."""
    up = await start_upstream()
    async with cost_proxy(_config(up, {"path": str(tmp_path / "l.db")})) as proxy:
        aid = await _spoken(proxy.url, ALICE, "charlie-secret", False)
        raw = (
            '{"model": "m", "messages": [{"role": "user", "content": "hi"},'
            f' {{"role": "assistant", "\\u0061udio": {{"id": "{aid}"}}}}, {{"role": "user", "content": "again?"}}]}}'
        )
        hdrs = {"Authorization": f"Bearer {BOB}", "Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + "/v1/chat/completions", data=raw, headers=hdrs) as r,
        ):
            status, body = r.status, await r.json()
    assert status == 404, body
    assert body["error"]["code"] == "audio_not_found" and body["error"]["param"] == "messages[1].audio.id"
    assert "charlie-secret" not in str(body)


async def test_a_history_naming_its_audio_often_looks_it_up_once(start_upstream: Any, tmp_path: Path) -> None:
    """A long conversation sends its spoken turns back each time: each distinct audio id is
    looked up once (the store's SELECTs counted by SQLite), not once per time it is named."""
    up = await start_upstream()
    async with cost_proxy(_config(up, {"path": str(tmp_path / "l.db")})) as proxy:
        aid = await _spoken(proxy.url, ALICE, "echo-secret", False)
        turn: Any = [{"role": "assistant", "audio": {"id": aid}}, {"role": "user", "content": "and again?"}]
        messages: Any = [{"role": "user", "content": "say something"}, *turn * 200]
        with store_statements(proxy.app) as sql:
            async with _client(proxy.url, ALICE_TOO) as client:
                done = await client.chat.completions.create(model="m", messages=messages)
        assert "echo-secret" in (done.choices[0].message.content or "")  # served: the team's own audio
        assert sum("FROM gov_response_owners" in s for s in sql) == 1


async def test_a_keyless_server_replays_audio_with_no_setup(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    async with cost_proxy(_config(up, {"path": str(tmp_path / "l.db")}, keys=None)) as proxy:
        aid = await _spoken(proxy.url, "unused", "delta-secret", True)
        assert "delta-secret" in await _replayed(proxy.url, "unused", aid)


async def test_two_instances_on_postgres_share_the_audio_bindings(
    pg_schema_dsn: str, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    shared = {"redis_url": require_redis(), "prefix": f"au-{uuid.uuid4().hex[:8]}"}
    cfg = _config(up, {"backend": "postgres", "dsn": pg_schema_dsn}, shared_state=shared)
    path = write_config(tmp_path / "edgeroute.yaml", cfg)
    with instances(path, 2) as (one, two):
        aid = await _spoken(one.url, BOB, "echo-secret-5", True)
        with pytest.raises(openai.NotFoundError):
            await _replayed(two.url, ALICE, aid)
        assert "echo-secret-5" in await _replayed(two.url, BOB, aid)


async def test_an_audio_id_split_across_upstream_reads_is_still_its_tenants(tmp_path: Path) -> None:
    """An upstream read that ends inside an event (`..."aud` | `io": {"id": ...}}`) still binds
    the id to its tenant. This pins behaviour (it held before: the chat translator hands the
    binding whole events); the binding now also splits any read that does not end an event."""
    event = b"data: " + orjson.dumps(
        {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "x",
         "choices": [{"index": 0, "delta": {"role": "assistant", "audio": {"id": "audio_split_1", "transcript": "hi"}},
                      "finish_reason": None}]}
    ) + b"\n\n"  # fmt: skip
    cut = event.index(b'"audio"') + 4
    finish = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"x",' + (
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    )
    said = {"id": "c2", "object": "chat.completion", "created": 1, "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "heard it"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(said)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in (event[:cut], event[cut:], finish, b"data: [DONE]\n\n"):
            await resp.write(piece)
            await asyncio.sleep(0.05)  # each its own read at the proxy
        return resp

    async with routes_upstream(web.post("/v1/chat/completions", chat)) as up:
        cfg = {
            "providers": {"a": {"kind": "openai", "base_url": up.url + "/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "a", "model": "x", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}},
            "models": {"m": {"deployments": ["d"]}},
            "ledger": {"path": str(tmp_path / "l.db")},
            "keys": _KEYS,
        }
        async with cost_proxy(cfg) as proxy:
            assert await _spoken(proxy.url, ALICE, "hello", stream=True) == "audio_split_1"
            assert await _replayed(proxy.url, ALICE_TOO, "audio_split_1") == "heard it"
