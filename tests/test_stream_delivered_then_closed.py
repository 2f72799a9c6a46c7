"""A client that closes its connection as soon as a stream has ended (curl does) while edgeroute
still counts the usage-less stream: the answer was delivered whole, and is recorded served (it
was `client_gone`), and priced."""

from __future__ import annotations

import asyncio
import json
import random
import string
from typing import Any

from aiohttp import web

from tests.conftest import ServeRoutes, eventually

# ~600 KB of words no tokenizer cache knows: counted (in a worker thread) for tens of milliseconds.
_RNG = random.Random(7)
TEXT = " ".join("".join(_RNG.choices(string.ascii_lowercase, k=_RNG.randint(3, 9))) for _ in range(90_000))


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
    for delta, finish in (({"role": "assistant", "content": TEXT}, None), ({}, "stop")):
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if finish is None:
            await asyncio.sleep(0.2)  # the text read by the client meanwhile: its end comes alone
    await resp.write(b"data: [DONE]\n\n")  # no usage, asked or not
    return resp


def _unchunked(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's data."""
    out, at = [], 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2 : eol + 2 + size])
        at = eol + 2 + size + 2


async def test_a_stream_read_whole_then_closed_is_served(start_proxy: Any, serve_routes: ServeRoutes) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _chat))
    price = {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
    proxy = await start_proxy(
        {
            "providers": {"p": {"kind": "openai_compatible", "base_url": up.url + "/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "x", "price": price}},
            "models": {"m": {"deployments": ["d"]}},
        }
    )
    # As curl reads a stream: to the end of its last chunk, then the connection closed at once.
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 24)
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = await asyncio.wait_for(reader.readuntil(b"\n\n"), 30)  # the text's event
    got += await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 30)  # to the last chunk
    writer.close()
    head_end = got.index(b"\r\n\r\n") + 4
    assert got.startswith(b"HTTP/1.1 200")
    events = _unchunked(got[head_end:])
    assert events.endswith(b"data: [DONE]\n\n") and json.dumps(TEXT).encode() in events

    async def written() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    rec = await eventually(written, "the request's record")
    assert (rec.outcome, rec.error_class, rec.status) == ("ok", None, 200)
    assert rec.usage is not None and rec.usage.estimated and rec.usage.completion_tokens > 100_000
    assert rec.cost_usd > 0.1
