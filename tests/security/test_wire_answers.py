"""edgeroute's HTTP/1.1 server on the wire, seen from a client on a raw socket (red team
redW, session 31): a request target yarl refuses late is a 400, never a connection left
"busy" forever; a stream without framing (HTTP/1.0) ends its connection; a client reading
nothing of an answer is dropped at `send_timeout`; pipelined requests are not read ahead
while one is answered."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from edgeroute.http_connection import BODY_STALL_S
from tests.conftest import ServeRoutes
from tests.security.conftest import openai_answer

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
BIG = 16 * 1024 * 1024  # an answer far larger than any socket buffer


_STALLED: list[asyncio.Event] = []  # the "stall" answers held until the test releases them


def _release_stalls() -> None:
    """Lets the held answers go (the server's shutdown waits for requests in flight)."""
    while _STALLED:
        _STALLED.pop().set()


async def _upstream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    content = body["messages"][0]["content"]
    if content == "stall":
        _STALLED.append(held := asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(held.wait(), 30)
    if content.startswith("bytes:"):  # an answer of about this many bytes
        return await openai_answer(request, body, "x" * int(content[6:]), USAGE)
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


# -- red3W H1: an answer whose tail stays below the high-water mark, never read -------------
# The kernel's buffers take megabytes of answers a client does not read; the last answer's
# tail then waits in the transport (under 64 KiB: writing never pauses). A close waited for it
# forever, so the connection stayed open, counted, and shedding it did nothing.

TAIL = 56_000  # one answer's content: its tail stays under the transport's 64 KiB high-water mark


def _send_queue(port: int, client_port: int) -> int | None:
    """The kernel's send queue of the server's end of one connection (None: not established)."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[1]) if out else None


async def _send_queue_after(port: int, client_port: int, before: int) -> int:
    """The send queue once an answer went into it: grown, then steady (or, grown by
    nothing within a second, the answer is all in the transport)."""
    now = before
    for _ in range(100):
        await asyncio.sleep(0.01)
        last, now = now, _send_queue(port, client_port) or 0
        if now == last != before:
            return now
    return now


async def _zombie(port: int) -> tuple[socket.socket, int]:
    """A client that asks for answers and reads none, until one no longer fits in the
    kernel's buffers: that answer waits (in part) in the server's transport, under 64 KiB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    client_port = sock.getsockname()[1]
    request = _chat(f"bytes:{TAIL}")
    queued = None  # the first answer fills the client's small receive buffer too
    for _ in range(400):
        await loop.sock_sendall(sock, request)
        now = await _send_queue_after(port, client_port, queued or 0)
        if queued is not None and now - queued < TAIL - 2000:  # part of this answer waits in the transport
            return sock, client_port
        queued = now
    raise AssertionError("the kernel took every answer")


async def test_a_client_never_reading_an_answers_tail_is_dropped(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes, header_timeout=1, send_timeout=2)
    sock, client_port = await _zombie(proxy.port)
    # The header timer closes it at 1 s (the close waits for its last bytes); they do not go for 2 s.
    await asyncio.sleep(5)
    gone = _send_queue(proxy.port, client_port) is None
    sock.close()
    assert gone, "the server still holds a connection whose client read nothing for 5 s"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="progress is read from Linux's tcp_info")
async def test_a_client_never_reading_but_asking_again_is_dropped(serve: Any, serve_routes: ServeRoutes) -> None:
    """More answers written behind the tail (a small request now and then, each answer
    under the high-water mark) are not the client reading: the clock is not set back."""
    proxy = await _proxy(serve, serve_routes, header_timeout=5, send_timeout=1)
    sock, client_port = await _zombie(proxy.port)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError):
        for _ in range(12):  # 4 s: a request every 0.3 s keeps it from being idle
            await loop.sock_sendall(sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await asyncio.sleep(0.3)
    gone = _send_queue(proxy.port, client_port) is None
    sock.close()
    assert gone, "the server still holds a connection whose client read nothing for 4 s"


def _server_connections(port: int) -> int:
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


async def test_clients_never_reading_are_shed_at_the_connection_cap(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes, header_timeout=1, send_timeout=60, max_client_connections=2)
    zombies = [await _zombie(proxy.port) for _ in range(2)]
    await asyncio.sleep(1.5)  # closed by the header timer, their last bytes unsent
    clients = []
    for _ in range(2):  # each new client sheds one: it must go, not stay open past the cap
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(4):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        clients.append(writer)
    await asyncio.sleep(0.2)
    held = [c for _, c in zombies if _send_queue(proxy.port, c) is not None]
    open_now = _server_connections(proxy.port)
    for sock, _ in zombies:
        sock.close()
    for writer in clients:
        writer.close()
    assert not held and open_now <= 2, f"{open_now} connections open at a cap of 2, {len(held)} shed but open"


# -- red3W M1: at the cap, requests whose body never comes are shed (after idle ones) --------


def _head_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


async def _healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    data, _ = await _until_closed(reader, 4)
    writer.close()
    return data


async def _trickle(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose request sends one byte of its body, and no more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _chat("hi")
    writer.write(request[: len(_head_of(request)) + 1])
    await asyncio.sleep(0.1)
    return reader, writer


async def _shed_with_a_408(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data, _ = await _until_closed(reader, 4)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert orjson.loads(body)["error"]["code"] == "body_timeout"
    writer.close()  # gone, not lingering (a lingering connection is the first shed)
    await asyncio.sleep(0.2)


async def test_bodies_that_never_come_are_shed_at_the_connection_cap(serve: Any, serve_routes: ServeRoutes) -> None:
    proxy = await _proxy(serve, serve_routes, max_client_connections=3)  # body_timeout: 30 s
    answering = await asyncio.open_connection("127.0.0.1", proxy.port)
    answering[1].write(_chat("stall"))  # its body whole: answered (slowly), never shed
    trickled = await _trickle(proxy.port)
    expecting = await asyncio.open_connection("127.0.0.1", proxy.port)
    expecting[1].write(_head_of(_chat("hi", extra=b"Expect: 100-continue\r\n")))
    async with asyncio.timeout(4):
        assert (await expecting[0].readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
    await asyncio.sleep(BODY_STALL_S + 0.2)  # neither body has come on since
    # Every connection answering: a new client is served, the longest-waiting body shed.
    assert (await _healthz(proxy.port)).startswith(b"HTTP/1.1 200 ")
    await _shed_with_a_408(*trickled)
    assert not expecting[0].at_eof()
    trickled = await _trickle(proxy.port)  # at the cap again: now `expecting` waits longest
    await asyncio.sleep(BODY_STALL_S + 0.2)
    assert (await _healthz(proxy.port)).startswith(b"HTTP/1.1 200 ")
    await _shed_with_a_408(*expecting)
    assert not trickled[0].at_eof() and not answering[0].at_eof()  # still waiting
    for _, writer in (answering, trickled):
        writer.transport.abort()
    _release_stalls()


async def test_an_upload_still_coming_is_not_shed_at_the_connection_cap(serve: Any, serve_routes: ServeRoutes) -> None:
    """A newcomer at the cap, with no idle connection to shed, does not cost an honest upload
    its request (a 408 1.5 s into its 30 s `body_timeout`): it is refused instead."""
    proxy = await _proxy(serve, serve_routes, max_client_connections=3)
    answering = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(2)]
    for _, writer in answering:
        writer.write(_chat("stall"))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    request = _chat("hi" + "p" * 200_000)
    head = _head_of(request)
    body = request[len(head) :]
    writer.write(head)

    async def upload() -> None:  # about 40 KB/s, for 5 s
        for at in range(0, len(body), 4000):
            writer.write(body[at : at + 4000])
            await writer.drain()
            await asyncio.sleep(0.1)

    sending = asyncio.create_task(upload())
    await asyncio.sleep(1.5)  # under way, a byte never more than 0.1 s apart
    newcomer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await sending
    async with asyncio.timeout(8):
        answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    for _, w in (*answering, newcomer):
        w.transport.abort()
    writer.close()
    _release_stalls()


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
    _release_stalls()
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


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [
        (b"/v1/nothing", False, 401),
        (b"/v1/models", False, 401),  # a GET route, POSTed
        (b"/v1/messages/batches", False, 401),
        (b"/v1/nothing", True, 404),
        (b"/v1/models", True, 405),
    ],
)
async def test_100_continue_is_not_sent_for_a_path_that_is_no_route(
    serve: Any, serve_routes: ServeRoutes, path: bytes, key: bool, status: int
) -> None:
    """A 404 or 405 (or the 401 before it) needs no body: the client is not asked for one."""
    up = await serve_routes(web.post("/v1/chat/completions", _upstream))
    proxy = await serve(_config(up.url, api_keys=["sk-shared-0123456789abcdef"]))
    auth = b"Authorization: Bearer sk-shared-0123456789abcdef\r\n" if key else b""
    head = _head_of(_post(path, {"model": "m"}, extra=auth + b"Expect: 100-continue\r\n"))
    answer = await _exchange(proxy.port, head)
    assert _statuses(answer) == [status] and b"100 Continue" not in answer, answer
    body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert (body["type"] == "error") if path.startswith(b"/v1/messages") else ("error" in body)


@pytest.mark.parametrize(
    ("request_bytes", "allow"),
    [
        (b"PUT /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", b"POST"),
        (b"GET /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"POST"),
        (b"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", b"GET"),
    ],
)
async def test_a_405_says_which_methods_the_path_takes(
    serve: Any, serve_routes: ServeRoutes, request_bytes: bytes, allow: bytes
) -> None:
    """RFC 9110: a 405 carries `Allow`; the JSON error that replaced aiohttp's answer dropped it."""
    proxy = await _proxy(serve, serve_routes)
    answer = await _exchange(
        proxy.port, request_bytes + request_bytes.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1)
    )
    assert _statuses(answer) == [405, 405], answer
    head = answer.partition(b"\r\n\r\n")[0].lower()
    allowed = re.search(rb"\r\nallow: ([^\r]*)", head)
    assert allowed is not None and allow.lower() in allowed.group(1).split(b","), head


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


# -- red3W L1: a trailer section is held to the head's limit ----------------------------------


async def test_a_trailer_field_that_never_ends_is_refused_at_the_head_limit(
    serve: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: "
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head)
    answer = asyncio.ensure_future(_until_closed(reader, 20))
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < 1024 * 1024 and not answer.done():  # each piece a read of its own
            writer.write(b"a" * 1024)
            await writer.drain()
            sent += 1024
            await asyncio.sleep(0.001)
    data, _ = await answer
    writer.transport.abort()
    assert _statuses(data) in ([400], [431]) and sent <= 256 * 1024, f"{sent} bytes of one trailer field taken"


# -- red3W L2: a request asking to upgrade keeps its HTTP version -----------------------------


@pytest.mark.parametrize(("version", "status_line"), [(b"1.0", b"HTTP/1.0 200 "), (b"2.0", b"HTTP/1.1 505 ")])
async def test_an_upgrade_request_is_answered_in_its_own_version(
    serve: Any, serve_routes: ServeRoutes, version: bytes, status_line: bytes
) -> None:
    proxy = await _proxy(serve, serve_routes)
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    upgrade = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(_post(b"/v1/chat/completions", payload, version=version, extra=upgrade))
    data, took = await _until_closed(reader, 4.5)  # header_timeout is 5: kept open, it ended there
    writer.close()
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(status_line) and b"Transfer-Encoding" not in head
    assert took < 3


# -- red3W L4 / L9: an upstream out of step --------------------------------------------------


def _upstream_response(text: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text)


def _late_upstream(listener: socket.socket) -> None:
    """Answers the first request, then sends a response nobody asked for; every later request
    (on any connection) is answered with its own."""
    with contextlib.suppress(OSError):  # the listener closed: the test is over
        for n in range(3):
            conn, _ = listener.accept()
            with conn, contextlib.suppress(ConnectionError):  # dropped by the client
                answered = 0
                while data := conn.recv(65536):
                    answered += data.count(b"HTTP/1.1\r\n")
                    first = n == 0 and answered == 1
                    conn.sendall(_upstream_response(b"first" if first else b"its own answer"))
                    if first:
                        time.sleep(0.05)
                        conn.sendall(_upstream_response(b"LATE"))


async def test_a_late_upstream_response_is_not_the_next_requests_answer() -> None:
    """Bytes waiting unread on a pooled connection (here: arrived while the loop was busy)
    put it out of step: it is dropped, not reused for the next request."""
    import threading

    from edgeroute.upstream_http.client import HttpClient

    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_late_upstream, args=(listener,), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/x"
    client = HttpClient(limit=1, connect_timeout=2)
    try:
        async with asyncio.timeout(5):
            assert await (await client.request("POST", url, {}, b"{}")).read() == b"first"
            time.sleep(0.3)  # noqa: ASYNC251  # the loop busy: the late response waits in the kernel, unread
            second = await (await client.request("POST", url, {}, b"{}")).read()
    finally:
        await client.close()
        listener.close()
    assert second == b"its own answer"


async def test_a_malformed_upstream_response_is_the_upstreams_error(serve: Any) -> None:
    async def both_lengths(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"id":"x"}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
        )
        await writer.drain()

    raw = await asyncio.start_server(both_lengths, "127.0.0.1", 0)
    proxy = await serve(_config(f"http://127.0.0.1:{raw.sockets[0].getsockname()[1]}"))
    try:
        data = await _exchange(proxy.port, _chat("hi", extra=b"Connection: close\r\n"))
    finally:
        raw.close()
    assert _statuses(data) == [502]
    error = orjson.loads(data.partition(b"\r\n\r\n")[2])["error"]
    assert "connection failed" not in error["message"]
    attempt = proxy.recorder.records[-1].attempts[0]
    assert attempt.outcome == "server_error" and "malformed HTTP response" in attempt.error
