"""The work between an upstream's first content and the client's first token, through the
proxy with the official openai SDK: each piece of it done once, the stream's head as aiohttp
would have made it."""

from __future__ import annotations

import asyncio
from collections import Counter

import openai
import orjson

from edgeroute import sse
from tests.conftest import simple_config


async def _read_stream(proxy_url: str) -> str:
    client = openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key="x")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    return text


async def test_events_held_until_content_are_parsed_once(start_upstream, start_proxy, monkeypatch) -> None:
    """The events read before the first content (the role event, the first token's) are parsed
    once, by the check every relayed event passes: parsed a second time to find the content,
    the first token waited for both parses."""
    parsed: list[bytes] = []
    loads = orjson.loads

    def counting(data: bytes | str) -> object:
        parsed.append(data.encode() if isinstance(data, str) else bytes(data))
        return loads(data)

    monkeypatch.setattr(orjson, "loads", counting)
    up = await start_upstream(chunk_interval=0.01, reply_words=5)
    proxy = await start_proxy(simple_config({"a": up}))
    assert (await _read_stream(proxy.url)).startswith("Hello from gpt-4o-mini.")
    role = [p for p in parsed if b'"chat.completion.chunk"' in p and b'"role":"assistant"' in p]
    assert len(role) == 1, role


async def test_each_relayed_chunk_is_searched_once_for_an_error(start_upstream, start_proxy, monkeypatch) -> None:
    """A relayed chunk is searched for an error event's key once: the guard that redacts error
    events tells the relay what it found (it searched every chunk a second time)."""
    searched: list[bytes] = []
    has_error_key = sse.has_error_key

    def counting(data: bytes) -> bool:
        searched.append(data)
        return has_error_key(data)

    monkeypatch.setattr(sse, "has_error_key", counting)
    up = await start_upstream(chunk_interval=0.01, reply_words=8)
    proxy = await start_proxy(simple_config({"a": up}))
    assert (await _read_stream(proxy.url)).startswith("Hello from gpt-4o-mini.")
    relayed = [d for d in searched if b"chat.completion.chunk" in d]
    assert len(relayed) >= 8
    assert max(Counter(relayed).values()) == 1


async def test_stream_to_an_http10_client_ends_with_its_connection(start_upstream, start_proxy) -> None:
    """An HTTP/1.0 client has no chunked encoding: its stream is the events as they are, ended
    by closing the connection, with the head every stream has."""
    up = await start_upstream(reply_words=3)
    proxy = await start_proxy(simple_config({"a": up}))
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (f"{host}:{port}".encode(), len(body), body)
    )
    raw = await asyncio.wait_for(reader.read(), 10)  # to the end: the server closes the stream
    writer.close()
    head, events = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.0 200 OK"
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    assert fields["content-type"] == "text/event-stream"
    assert fields["cache-control"] == "no-cache"
    assert fields["server"] == "edgeroute"
    assert "transfer-encoding" not in fields and "date" in fields
    assert fields["x-edgeroute-deployment"] == "d-a"
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
