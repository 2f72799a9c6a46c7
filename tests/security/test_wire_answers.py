"""edgeroute's HTTP/1.1 server on the wire, seen from a client on a raw socket (red team
redW, session 31): a request target yarl refuses late is a 400, never a connection left
"busy" forever; a stream without framing (HTTP/1.0) ends its connection; a client reading
nothing of an answer is dropped at `send_timeout`; pipelined requests are not read ahead
while one is answered."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import ServeRoutes
from tests.security.conftest import openai_answer

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
BIG = 16 * 1024 * 1024  # an answer far larger than any socket buffer


async def _upstream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    content = body["messages"][0]["content"]
    if content == "stall":
        await asyncio.sleep(30)
    return await openai_answer(request, body, "x" * BIG if content == "big" else "hi", USAGE)


def _config(base_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"header_timeout": 5, **server},
        "providers": {"p": {"base_url": base_url + "/v1", "api_key": "sk-up"}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o-mini", "price": {"input_per_mtok": 1, "output_per_mtok": 2}}
        },
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
    }


async def _proxy(serve: Any, serve_routes: ServeRoutes, **server: Any) -> Any:
    up = await serve_routes(web.post("/v1/chat/completions", _upstream), client_max_size=2**24)
    return await serve(_config(up.url, **server))


def _post(path: bytes, payload: dict[str, Any], *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    body = orjson.dumps(payload)
    return (
        b"POST " + path + b" HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _chat(content: str, **kw: Any) -> bytes:
    return _post(b"/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": content}]}, **kw)


async def _until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """What the server sent until it closed, and how long that took."""
    start = time.monotonic()
    async with asyncio.timeout(within):
        data = await reader.read(-1)
    return data, time.monotonic() - start


# -- H1: absolute-form targets whose port or host yarl refuses only when read ----------------

BAD_TARGETS = [
    b"http://a:99999/v1/models",
    b"http://a:65536/",
    b"http://a:-1/",
    b"http://a:1x/",
    b"https://a:70000/",
    b"http://xn--/",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_a_target_with_a_bad_port_or_host_is_a_400_and_closes(
    serve: Any, serve_routes: ServeRoutes, target: bytes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data, took = await _until_closed(reader, 4)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert orjson.loads(body)["error"]["code"] == "malformed_request"
    assert took < 3


async def test_bad_targets_at_the_connection_cap_do_not_lock_clients_out(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes, max_client_connections=4)
    held = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET http://a:99999/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        held.append((reader, writer))
    await asyncio.sleep(0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data, _ = await _until_closed(reader, 4)
    assert data.startswith(b"HTTP/1.1 200 ")
    for _, w in [*held, (reader, writer)]:
        w.close()


async def test_a_request_that_cannot_be_made_leaves_no_connection_busy(
    serve: Any, serve_routes: ServeRoutes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception making the request (not only yarl's) closes the connection: it is never
    left answering forever, unshed and undrained."""
    proxy = await _proxy(serve, serve_routes)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot make this request")

    monkeypatch.setattr(proxy.app, "_make_request", broken)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    _, took = await _until_closed(reader, 4)
    writer.close()
    assert took < 3


# -- M1: a stream with no framing (HTTP/1.0) ends its connection ------------------------------

STREAMS = [
    (b"/v1/chat/completions", b"[DONE]"),
    (b"/v1/messages", b"message_stop"),
]


@pytest.mark.parametrize(("path", "end"), STREAMS)
async def test_an_http10_stream_closes_at_its_end_and_answers_nothing_after(
    serve: Any, serve_routes: ServeRoutes, path: bytes, end: bytes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    payload: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if path == b"/v1/messages":
        payload["max_tokens"] = 16
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    second = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    writer.write(_post(path, payload, version=b"1.0", extra=b"Connection: keep-alive\r\n") + second)
    data, took = await _until_closed(reader, 4.5)  # header_timeout is 5: the old way ended there
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and end in body
    assert b"HTTP/1.0 200" not in body and b'"status":"ok"' not in body  # the second is not answered inside it
    assert took < 3


# -- M2: a client that reads nothing of a whole answer ---------------------------------------


async def test_a_client_reading_nothing_of_an_answer_is_dropped_at_send_timeout(
    serve: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(serve, serve_routes, send_timeout=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    writer.write(_chat("big"))
    await asyncio.sleep(6)  # the answer arrives within 1-2 s, then no progress for send_timeout
    got = 0
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(5):
            while True:
                chunk = await reader.read(2**20)
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", None)
                got += len(chunk)
    writer.close()
    assert got < BIG  # cut off: not the whole answer kept for it


# -- M3: pipelined requests are not read while one is answered -------------------------------


async def test_pipelined_bodies_are_not_read_ahead_while_a_request_is_answered(
    serve: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    sock.connect(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    queued = b"".join(_chat("q" * 120 * 1024) for _ in range(31))
    writer.write(_chat("stall") + queued)
    await asyncio.sleep(2)
    taken = len(queued) - writer.transport.get_write_buffer_size()
    writer.transport.abort()
    assert taken < 1024 * 1024, f"{taken} bytes of pipelined requests read while the first is answered"


# -- Lows: framing and version strictness, refusals in the endpoint's format ----------------


async def _exchange(port: int, *pieces: bytes, within: float = 4) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)  # apart: each a read of its own
    data, _ = await _until_closed(reader, within)
    writer.close()
    return data


def _statuses(data: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


async def test_two_transfer_encoding_headers_are_refused(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    chunked = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    data = await _exchange(
        proxy.port, head + b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    assert _statuses(data) == [400] and b"malformed_request" in data


@pytest.mark.parametrize(
    ("line", "status"), [(b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 505), (b"GET /healthz\r\n\r\n", 400)]
)
async def test_versions_other_than_http1x_are_refused(
    serve: Any, serve_routes: ServeRoutes, line: bytes, status: int
) -> None:
    proxy = await _proxy(serve, serve_routes)
    assert _statuses(await _exchange(proxy.port, line)) == [status]


async def test_two_host_headers_are_refused(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes)
    data = await _exchange(proxy.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
    assert _statuses(data) == [400]


async def test_an_http10_chunked_request_closes_after_its_answer(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    data = await _exchange(proxy.port, request + b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert _statuses(data) == [200]  # answered, then closed: the next is not read past faulty framing


async def test_a_pipelined_request_after_a_body_is_not_taken_for_a_long_head(
    serve: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    request = _chat("y" * 40_000)
    second = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    data = await _exchange(proxy.port, request[:60], request[60:] + second[:10], second[10:])
    assert _statuses(data) == [200, 200]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["431", "cl+te"],
)
async def test_protocol_refusals_on_messages_are_in_anthropics_format(
    serve: Any, serve_routes: ServeRoutes, request_bytes: bytes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    data = await _exchange(proxy.port, request_bytes)
    error = orjson.loads(data.partition(b"\r\n\r\n")[2])
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"


async def test_100_continue_comes_only_after_authentication(serve: Any, serve_routes: ServeRoutes) -> None:
    up = await serve_routes(web.post("/v1/chat/completions", _upstream))
    cfg = _config(up.url, api_keys=["sk-shared-0123456789abcdef"])
    proxy = await serve(cfg)
    head, _, body = _chat("x" * 2000, extra=b"Expect: 100-continue\r\n").partition(b"\r\n\r\n")
    refused = await _exchange(proxy.port, head + b"\r\n\r\n")  # no key: told so without asking for the body
    assert _statuses(refused) == [401] and b"100 Continue" not in refused
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head + b"\r\nAuthorization: Bearer sk-shared-0123456789abcdef\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    async with asyncio.timeout(5):
        answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")


async def test_chunk_extensions_count_toward_the_body_limit(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes, max_body_bytes=65536)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    ext = b";" + b"a" * 60_000
    chunks = b"".join(b"%x%b\r\n%b\r\n" % (1, ext, body[i : i + 1]) for i in range(len(body)))  # ~3 MB, body 60 bytes
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head + chunks + b"0\r\n\r\n")
    data, _ = await _until_closed(reader, 5)
    writer.transport.abort()
    assert _statuses(data) == [413]
