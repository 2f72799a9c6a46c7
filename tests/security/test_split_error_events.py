"""Credential leak across network reads: a careless upstream's error event that quotes a
secret, delivered in two reads split at any byte (inside the secret, inside the `"error"`
key, inside a UTF-8 sequence), never reaches the client.

The relay redacted each read on its own: the first half of a key matched nothing, the second
half came in a read without `"error"` and went out as it was, and the client's SDK joined
them. Each test here splits one error event at every byte offset of the secret (and of the
event's start, and of the multi-byte characters around the secret), sends the first part,
waits until the client has seen the content before it (so the two parts are two reads at
the proxy), then sends the rest; the official SDKs read the streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import eventually, routes_upstream, start_routes
from tests.security.conftest import Served
from tests.test_cost_support import cost_proxy

# Our provider key, shapeless (32 hex digits: only the registry of known secrets finds it),
# and another party's key the upstream might quote (found by its shape).
OURS = "7c0ffee5ba11ad5e1f2a3b4c5d6e7f80"
THEIRS = "sk-ant-api03-ZyXwVuTsRqPoNmLkJiHg0123456789"
USER: Any = [{"role": "user", "content": "hello"}]


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(obj) + b"\n\n"


def _message(secret: str) -> str:
    # Multi-byte characters right against the secret: splits fall inside UTF-8 sequences too.
    return f"Incorrect API key provided: «{secret}» — clé refusée €"


def _chat_chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "x",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip


def _events(kind: str, secret: str) -> tuple[bytes, bytes]:
    """(content before the error, the error event) in the upstream format of `kind`."""
    msg = _message(secret)
    if kind == "chat":
        content = _sse(_chat_chunk({"role": "assistant", "content": "partial"}))
        return content, _sse({"error": {"message": msg, "type": "server_error", "code": None}})
    if kind == "completions":
        chunk = {"id": "c1", "object": "text_completion", "created": 0, "model": "x",
                 "choices": [{"index": 0, "text": "partial", "logprobs": None, "finish_reason": None}]}  # fmt: skip
        return _sse(chunk), _sse({"error": {"message": msg, "type": "server_error", "code": None}})
    if kind == "responses":
        delta = {"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "content_index": 0,
                 "delta": "partial", "sequence_number": 0, "logprobs": []}  # fmt: skip
        err = {"type": "error", "code": "server_error", "message": msg, "param": None, "sequence_number": 1}
        return _sse(delta, delta["type"]), _sse(err, "error")
    assert kind == "anthropic"
    start = {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
             "model": "x", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 3, "output_tokens": 1}}}  # fmt: skip
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "partial"}}
    content = _sse(start, "message_start") + _sse(block, "content_block_start") + _sse(delta, "content_block_delta")
    err = {"type": "error", "error": {"type": "api_error", "message": msg}}
    return content, _sse(err, "error")


def offsets(error_event: bytes, secret: str) -> list[int]:
    """Where to split the error event: every byte of its first 40 (the `"error"` key, the
    event line) and every byte from just before the secret's opening « to after its closing »."""
    at = error_event.index(secret.encode())
    return sorted(set(range(1, 40)) | set(range(at - 4, at + len(secret) + 4)))


@dataclass
class Careless:
    """An upstream that streams content, then an error event quoting `secret`, cut at `split`
    (the rest sent once the client has seen the content: `go`)."""

    secret: str = OURS
    split: int = 1
    go: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}
        content, error = _events(kind.get(request.path, "anthropic"), self.secret)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(content + error[: self.split])
        try:
            async with asyncio.timeout(10):
                await self.go.wait()
        except TimeoutError:  # the client saw nothing (a failure the test reports): send the rest anyway
            pass
        await resp.write(error[self.split :])
        await resp.write_eof()
        return resp

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def careless() -> AsyncIterator[Careless]:
    up = Careless()
    paths = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
    async with routes_upstream(*(web.post(path, up.handle) for path in paths)) as up.server:
        yield up


def _config(up: Careless, anthropic_kind: bool = False) -> dict[str, Any]:
    provider: dict[str, Any] = (
        {"kind": "anthropic", "base_url": up.url} if anthropic_kind else {"base_url": up.url + "/v1"}
    )
    return {
        "providers": {"p": {**provider, "api_key": OURS}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        },
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
    }


async def _seen_openai(client: openai.AsyncOpenAI, kind: str, up: Careless) -> str:
    """Everything the OpenAI SDK gave the caller: each event and the error it raised."""
    seen: list[str] = []
    try:
        if kind == "chat":
            stream: Any = await client.chat.completions.create(model="m", messages=USER, stream=True)
        elif kind == "completions":
            stream = await client.completions.create(model="m", prompt="hello", stream=True)
        else:
            stream = await client.responses.create(model="m", input="hello", stream=True)
        async for event in stream:
            seen.append(event.model_dump_json())
            up.go.set()
    except openai.APIError as e:
        seen.append(f"{e} {e.body!r}")
    return "\n".join(seen)


async def _seen_anthropic(client: anthropic.AsyncAnthropic, native: bool, up: Careless) -> str:
    seen: list[str] = []
    extra: Any = (
        {"extra_body": {"top_k": 5}} if native else {}
    )  # a field the chat translation would lose: passed through
    try:
        async with client.messages.stream(model="m", max_tokens=10, messages=USER, **extra) as stream:
            async for event in stream:
                seen.append(event.model_dump_json())
                up.go.set()
    except anthropic.APIError as e:
        seen.append(f"{e} {e.body!r}")
    return "\n".join(seen)


async def _each_split(up: Careless, kind: str, secret: str, read: Any) -> None:
    _, error = _events(kind, secret)
    up.secret = secret
    leaked = []
    for split in offsets(error, secret):
        up.split, up.go = split, asyncio.Event()
        seen = await read()
        assert "partial" in seen, (split, seen)  # the content before the error did arrive
        if secret in seen:
            leaked.append(split)
    assert not leaked, f"{kind}: the secret reached the client with the event split at bytes {leaked}"


@pytest.mark.parametrize("kind", ["chat", "completions", "responses", "responses-over-chat"])
async def test_credential_leak_error_event_split_at_every_byte_openai_sdk(
    careless: Careless, serve: Any, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(careless)
    if kind == "responses-over-chat":  # a deployment that speaks chat only: its stream translated
        cfg["providers"]["p"] |= {"kind": "openai_compatible", "options": {"responses": False}}
    proxy: Served = await serve(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        upstream = "chat" if kind == "responses-over-chat" else kind
        await _each_split(careless, upstream, OURS, lambda: _seen_openai(client, kind, careless))
        if kind == "chat":  # another party's key, found by its shape
            await _each_split(careless, kind, THEIRS, lambda: _seen_openai(client, kind, careless))
    finally:
        await client.close()
    assert OURS not in caplog.text and THEIRS not in caplog.text  # nor in any log record, before its filter


@pytest.mark.parametrize("native", [False, True], ids=["translated", "passed-through"])
async def test_credential_leak_error_event_split_at_every_byte_anthropic_sdk(
    careless: Careless, serve: Any, native: bool
) -> None:
    proxy: Served = await serve(_config(careless, anthropic_kind=True))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        await _each_split(careless, "anthropic", OURS, lambda: _seen_anthropic(client, native, careless))
    finally:
        await client.close()


async def test_messages_over_an_openai_deployment_split_at_every_byte(careless: Careless, serve: Any) -> None:
    """`/v1/messages` answered by an OpenAI-format deployment: its chat error event, split."""
    proxy: Served = await serve(_config(careless))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        _, error = _events("chat", OURS)
        careless.secret = OURS
        for split in offsets(error, OURS):
            careless.split, careless.go = split, asyncio.Event()
            seen = await _seen_anthropic(client, False, careless)
            assert "partial" in seen and OURS not in seen, split
    finally:
        await client.close()


ENDPOINTS = {
    "chat/completions": {"model": "m", "messages": USER},
    "completions": {"model": "m", "prompt": "hi"},
    "embeddings": {"model": "m", "input": "hi"},
    "responses": {"model": "m", "input": "hi"},
    "chat/completions?stream": {"model": "m", "messages": USER, "stream": True},
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_a_secret_at_the_cut_of_an_error_message_is_not_halved(
    careless: Careless, tmp_path: Path, endpoint: str
) -> None:
    """Upstream messages are cut (500 characters) before they reach the client's error and the
    request log: the cut fell inside a key, and the half left matched nothing (every endpoint,
    JSON or stream)."""
    body_for: dict[str, bytes] = {}

    async def error_500(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=500, body=body_for["body"], content_type="application/json")

    paths = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
    server = await start_routes(*(web.post(path, error_500) for path in paths))
    cfg = _config(careless)
    cfg["providers"]["p"]["base_url"] = server.url + "/v1"
    cfg["ledger"] = {"path": str(tmp_path / "ledger.db"), "flush_interval": 0.05}
    cfg["request_log"] = {"log_content": "redacted"}  # with content off, no upstream words are kept at all
    try:
        async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:  # the request log as configured
            for pad in range(470, 500, 4):  # the key straddles character 500 of the message
                msg = "x" * pad + " " + OURS + " was refused"
                body_for["body"] = orjson.dumps({"error": {"message": msg, "type": "server_error"}})
                url = f"{proxy.url}/v1/{endpoint.split('?')[0]}"
                async with s.post(url, json=ENDPOINTS[endpoint]) as r:
                    text, rid = await r.text(), r.headers["x-request-id"]
                assert r.status == 502, text
                assert OURS[:8] not in text and OURS[-8:] not in text, (pad, text)

                async def logged(rid: str = rid) -> str:
                    async with s.get(f"{proxy.url}/admin/requests/{rid}") as got:
                        return await got.text() if got.status == 200 else ""

                stored = await eventually(logged, "the request in the request log")
                assert "x" * 50 in stored and OURS[:8] not in stored and OURS[-8:] not in stored, (pad, stored)
    finally:
        await server.close()


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_the_relay_guard_sends_every_byte_of_content_and_no_split_secret(eol: bytes) -> None:
    """The guard itself, over every way of cutting a stream in three reads: content goes out
    byte for byte (nothing lost, nothing added), whatever the line ends; the quoted key never."""
    from edgeroute import redact, sse

    redact.register(OURS)
    content = b"".join(_sse(_chat_chunk({"content": f"t{i} «é»"})) for i in range(3)).replace(b"\n", eol)
    error = _sse({"error": {"message": _message(OURS)}}).replace(b"\n", eol)
    for stream, has_error in ((content, False), (content + error + content, True)):
        for a in range(0, len(stream), 7):
            for b in range(a, len(stream), 11):
                guard = sse.RelayGuard()
                out = b"".join(guard.feed(p) for p in (stream[:a], stream[a:b], stream[b:]) if p) + guard.close()
                if has_error:
                    assert OURS.encode() not in out and b"[REDACTED]" in out
                else:
                    assert out == stream


def test_a_huge_event_goes_out_in_pieces_and_a_long_error_event_whole() -> None:
    from edgeroute import redact, sse

    redact.register(OURS)

    text = b"data: " + orjson.dumps({"choices": [{"delta": {"content": "x" * (3 << 20)}}]}) + b"\n\n"
    guard = sse.RelayGuard()
    sent = [guard.feed(text[i : i + 65536]) for i in range(0, len(text), 65536)]
    assert sum(1 for s in sent if s) > 2 and b"".join(sent) == text  # not held to its end
    err = _sse({"error": {"message": OURS + " " + "y" * (sse.HOLD_BYTES - 4096) + " " + OURS}})
    guard = sse.RelayGuard()
    sent = [guard.feed(err[i : i + 65536]) for i in range(0, len(err), 65536)]
    assert not any(sent[:-1]) and OURS.encode() not in sent[-1] and b"[REDACTED]" in sent[-1]
    # Held whole, then relayed rebuilt, its message cut (`test_stream_large_error_event`).
    assert len(sent[-1]) < sse.ERROR_EVENT_BYTES and b"characters cut]" in sent[-1]


def test_an_error_event_past_the_hold_bound_is_refused_never_relayed() -> None:
    """An error event still unfinished past 1 MiB is the upstream's protocol error (the relay
    ends the stream with its own error event); none of its bytes go out."""
    from edgeroute import sse

    err = _sse({"error": {"message": OURS + " " + "y" * (3 << 20)}})
    guard = sse.RelayGuard()
    sent: list[bytes] = []
    with pytest.raises(sse.EventTooLarge, match="error event still unfinished past 1 MiB"):
        for i in range(0, len(err), 65536):
            sent.append(guard.feed(err[i : i + 65536]))
    assert not any(sent) and sse.HOLD_BYTES <= len(sent) * 65536 < sse.HOLD_BYTES + 65536
