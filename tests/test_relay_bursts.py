"""What a relayed stream costs the proxy: a burst of events that reached it together (a fast
upstream, a busy loop) goes to the client in one write, not one write an event (the same bytes,
in order, the official openai SDK reading the same answer), and its idle timer asks asyncio
for nothing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import orjson
import pytest

from tests.conftest import simple_config

WORDS = [f"w{i}" for i in range(40)]


def _event(obj: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _events() -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    out = [_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    out += [_event({**base, "choices": [{"index": 0, "delta": {"content": w + " "}}]}) for w in WORDS]
    out.append(_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    usage = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)}
    out.append(_event({**base, "choices": [], "usage": usage}))
    out.append(b"data: [DONE]\n\n")
    return out


@dataclass
class BurstUpstream:
    """An upstream that answers a stream with every event in its own HTTP chunk, all of them
    in one TCP write: they reach the proxy together."""

    base_url: str


@pytest.fixture
async def burst_upstream() -> AsyncIterator[BurstUpstream]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        body = b"".join(b"%x\r\n%s\r\n" % (len(ev), ev) for ev in _events()) + b"0\r\n\r\n"
        head_out = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head_out + body)
        await writer.drain()
        await reader.read()  # until the proxy closes its connection
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield BurstUpstream(f"http://127.0.0.1:{port}/v1")
    server.close()


async def _raw_stream(url: str) -> list[bytes]:
    """The HTTP chunks of the proxy's streamed answer, as the client received them."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nAuthorization: Bearer x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), port.encode(), len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower()
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        chunks.append(data[:-2])
    writer.close()
    return chunks


async def test_a_burst_of_events_goes_to_the_client_in_one_write(burst_upstream, start_proxy) -> None:
    proxy = await start_proxy(simple_config({"a": burst_upstream}))
    chunks = await _raw_stream(proxy.url)
    # The same bytes, in order (the usage chunk kept: the client asked without usage, the
    # proxy asked with it; it is dropped, as ever).
    sent = [ev for ev in _events() if b'"usage"' not in ev]
    assert b"".join(chunks) == b"".join(sent)
    # The first event went on its own (held until content); the 42 after it had arrived
    # together: one or two writes (a read may end mid-burst), not one an event.
    assert len(chunks) < 10, [len(c) for c in chunks]


async def test_the_sdk_reads_a_burst_whole(burst_upstream, start_proxy) -> None:
    proxy = await start_proxy(simple_config({"a": burst_upstream}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    got = [c async for c in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "".join(w + " " for w in WORDS)
    assert got[-1].choices[0].finish_reason == "stop"
    assert proxy.recorder.records[-1].attempts[-1].usage.completion_tokens == len(WORDS)


async def test_a_relayed_stream_does_not_ask_asyncio_for_the_running_loop(
    start_upstream, start_proxy, monkeypatch
) -> None:
    """The relay's idle timer is on the loop's shared deadline timer: `asyncio.timeout_at` asked
    for the running loop three times a stream (each a getpid() system call on Python 3.11) and
    made a uvloop timer of its own. The stream's timeouts are tested in test_stream_faults.py."""
    up = await start_upstream(chunk_interval=0.002, reply_words=6)
    proxy = await start_proxy(simple_config({"a": up}))
    relay, asked = sys.modules["edgeroute.dispatch.relay"].__file__, []
    real = asyncio.events.get_running_loop

    def get_running_loop() -> asyncio.AbstractEventLoop:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename == relay:
                asked.append(f"{sys._getframe(1).f_code.co_filename}:{sys._getframe(1).f_lineno}")
                break
            frame = frame.f_back
        return real()

    monkeypatch.setattr(asyncio.events, "get_running_loop", get_running_loop)
    monkeypatch.setattr(asyncio, "get_running_loop", get_running_loop)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert text.startswith("Hello from gpt-4o-mini.")
    assert asked == []
