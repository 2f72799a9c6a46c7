"""The upstream HTTP client (edgeroute.upstream_http) against real servers on loopback.

Plain-HTTP cases use edgeroute.bench.http1's server, whose connection objects let a test see and
break the wire (count connections, reset one, send raw bytes); https uses aiohttp's
server with a throwaway self-signed certificate. Each scenario runs on asyncio's own
loop and on uvloop (what `edgeroute serve` runs on).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

from edgeroute.bench.http1 import Conn, HttpServer, Request
from edgeroute.upstream_http.client import HttpClient
from edgeroute.upstream_http.errors import UpstreamConnectError, UpstreamConnectTimeout, UpstreamError
from tests.tls_fixtures import self_signed

Handler = Callable[[Request, Conn], Awaitable[None]]
Scenario = Callable[[], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


class Server:
    """edgeroute.bench.http1's server with a handler and what it saw."""

    def __init__(self, handler: Handler) -> None:
        self.seen: list[Request] = []
        self.per_conn: dict[Conn, int] = {}  # requests served per connection

        async def wrapped(req: Request, conn: Conn) -> None:
            self.seen.append(req)
            self.per_conn[conn] = self.per_conn.get(conn, 0) + 1
            await handler(req, conn)

        self.http = HttpServer(wrapped)

    async def __aenter__(self) -> Server:
        await self.http.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.stop()

    def url(self, path: str = "/v1/chat") -> str:
        return f"http://127.0.0.1:{self.http.port}{path}"

    @property
    def accepted(self) -> int:
        return self.http.connections_accepted


async def ok(req: Request, conn: Conn) -> None:
    conn.respond(200, b'{"path": "%s", "len": %d}' % (req.path.encode(), len(req.body)))


def client(limit: int = 8, connect_timeout: float = 2.0, **kw: Any) -> HttpClient:
    return HttpClient(limit, connect_timeout, **kw)


# -- keep-alive and bodies -----------------------------------------------------------------------


@scenario
async def keepalive_reuses_one_connection() -> None:
    async with Server(ok) as srv:
        c = client()
        for i in range(20):
            headers = {"Content-Type": "application/json"}
            async with await c.request("POST", srv.url(f"/v1/{i}"), headers, b"x" * i) as r:
                assert r.status == 200
                assert await r.read() == b'{"path": "/v1/%d", "len": %d}' % (i, i)
        assert srv.accepted == 1
        assert c.connections_opened == 1
        await c.close()


@scenario
async def a_large_body_arrives_whole_after_its_head() -> None:
    """A body over JOIN_BYTES is written after its head rather than copied behind it; it arrives
    the same, on a connection that serves the next request too."""
    from edgeroute.upstream_http.wire import JOIN_BYTES

    async with Server(ok) as srv:
        c = client()
        for size in (JOIN_BYTES, JOIN_BYTES + 1, 3 << 20):
            body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            async with await c.request("POST", srv.url(), {"Content-Type": "application/json"}, body) as r:
                assert await r.read() == b'{"path": "/v1/chat", "len": %d}' % size
            assert srv.seen[-1].body == body
        assert srv.accepted == 1
        await c.close()


@scenario
async def request_headers_are_sent() -> None:
    async with Server(ok) as srv:
        c = client()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k", "api-key": "v"}
        r = await c.request("POST", srv.url("/v1/chat/completions?api-version=1"), headers, b"{}")
        await r.read()
        req = srv.seen[0]
        assert req.method == "POST" and req.path == "/v1/chat/completions?api-version=1"
        assert req.headers["host"] == f"127.0.0.1:{srv.http.port}"
        assert req.headers["content-length"] == "2"
        assert req.headers["content-type"] == "application/json"
        assert req.headers["authorization"] == "Bearer k" and req.headers["api-key"] == "v"
        assert "accept-encoding" not in req.headers  # bodies must come back as identity
        r = await c.request("GET", srv.url("/v1/models"))
        await r.read()
        assert srv.seen[1].method == "GET" and "content-length" not in srv.seen[1].headers
        with pytest.raises(ValueError):
            await c.request("POST", srv.url(), {"X-Bad": "a\r\nInjected: 1"}, b"")
        await c.close()


@scenario
async def each_request_carries_its_own_headers_and_length() -> None:
    """The head is built once per method, URL and headers: a rotated key, a trace header or
    another body length reaches the upstream as sent, never a head an earlier request had."""
    async with Server(ok) as srv:
        c = client()
        url = srv.url("/v1/chat/completions")
        sent = [
            ({"Content-Type": "application/json", "Authorization": "Bearer old"}, b"{}"),
            ({"Content-Type": "application/json", "Authorization": "Bearer old"}, b'{"a": 1}'),
            ({"Content-Type": "application/json", "Authorization": "Bearer new"}, b"{}"),
            ({"Content-Type": "application/json", "Authorization": "Bearer new", "traceparent": "00-ab-cd-01"}, b""),
        ]
        for headers, body in sent:
            r = await c.request("POST", url, headers, body)
            await r.read()
        for (headers, body), req in zip(sent, srv.seen, strict=True):
            assert req.body == body and req.headers["content-length"] == str(len(body))
            assert req.headers["authorization"] == headers["Authorization"]
            assert req.headers.get("traceparent") == headers.get("traceparent")
        for _ in range(2):  # refused again, not served from a head built before
            with pytest.raises(ValueError):
                await c.request("POST", url, {"Authorization": "Bearer new\r\nInjected: 1"}, b"{}")
        assert len(srv.seen) == len(sent)
        await c.close()


@scenario
async def content_length_chunked_and_interim_bodies() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: arrives over many socket reads

    async def handler(req: Request, conn: Conn) -> None:
        if req.path == "/cl":
            conn.respond(200, big, headers=[("Retry-After", "7")])
        elif req.path == "/chunked":
            conn.start(200, "application/json")
            for i in range(0, len(big), 100_000):
                conn.chunk(big[i : i + 100_000])
                await asyncio.sleep(0)
            conn.end()
        elif req.path == "/interim":
            conn.write_raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
            conn.respond(201, b"after interim")

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url("/cl"), {}, b"{}")
        assert r.status == 200 and r.headers["retry-after"] == "7" and r.headers["RETRY-AFTER"] == "7"
        assert await r.read() == big
        r = await c.request("POST", srv.url("/chunked"), {}, b"{}")
        assert await r.read() == big
        r = await c.request("POST", srv.url("/interim"), {}, b"{}")
        assert r.status == 201 and "link" not in r.headers
        assert await r.read() == b"after interim"
        assert srv.accepted == 1  # all three left the connection reusable
        await c.close()


@scenario
async def a_head_sent_in_pieces_is_read_as_sent() -> None:
    """A head's fields are read from its bytes when first asked for: as sent, however the head
    was cut across reads (a name, a value), repeated fields kept in order, an interim head's
    fields and a chunked body's trailer not among them."""
    pieces = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 429 Too Many Requests\r\nRetry-Af",
        b"ter: 7\r\nX-Many: a\r\nX-Ma",
        b"ny: b\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Trailer: t\r\n\r\n",
    )

    async def handler(req: Request, conn: Conn) -> None:
        for piece in pieces:
            conn.write_raw(piece)
            await asyncio.sleep(0.01)

    async with Server(handler) as srv:
        c = client()
        for _ in range(2):  # the second on the connection the first left in the pool
            r = await c.request("POST", srv.url(), {}, b"{}")
            assert r.status == 429
            assert await r.read() == b"hi"
            assert r.headers["retry-after"] == "7" and r.headers.getall("x-many") == ["a", "b"]
            assert "link" not in r.headers and "x-trailer" not in r.headers
        assert srv.accepted == 1
        await c.close()


@scenario
async def close_delimited_body_is_read_to_eof_and_not_reused() -> None:
    async def handler(req: Request, conn: Conn) -> None:
        conn.write_raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await asyncio.sleep(0.02)
        conn.write_raw(b"the end")
        conn.close()

    async with Server(handler) as srv:
        c = client()
        for _ in range(2):
            r = await c.request("POST", srv.url(), {}, b"{}")
            assert await r.read() == b"until the end"
        assert srv.accepted == 2
        await c.close()


# -- streaming -----------------------------------------------------------------------------------


@scenario
async def stream_pieces_arrive_one_by_one_unmerged() -> None:
    sent: list[float] = []
    gap = 0.05

    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200)
        for i in range(5):
            conn.chunk(b"data: %d\n\n" % i)
            sent.append(time.perf_counter())
            await asyncio.sleep(gap)
        conn.end()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url(), {}, b"{}")
        got: list[tuple[float, bytes]] = []
        while piece := await r.readany():
            got.append((time.perf_counter(), piece))
        assert [p for _, p in got] == [b"data: %d\n\n" % i for i in range(5)]
        # Each piece was handed over when it arrived, not when the stream ended.
        assert got[0][0] < sent[-1]
        arrivals = [t for t, _ in got]
        assert arrivals[-1] - arrivals[0] >= 2 * gap  # spread out as sent (4 gaps), with slack for a busy machine
        await c.close()


@scenario
async def pieces_arrived_together_are_read_together_up_to_a_limit() -> None:
    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200)
        for i in range(10):
            conn.chunk(b"data: %d%s\n\n" % (i, b"x" * 91))  # 100 bytes each, one HTTP chunk each
        conn.end()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url(), {}, b"{}")
        await asyncio.sleep(0.2)  # all ten have arrived
        first = await r.read_arrived(450)
        assert len(first) == 500  # joined while under the limit: the fifth piece crossed it
        assert await r.read_arrived(10_000) == b"".join(b"data: %d%s\n\n" % (i, b"x" * 91) for i in range(5, 10))
        assert await r.read_arrived(10_000) == b""
        await c.close()


@scenario
async def a_paused_socket_resumes_for_a_joined_read() -> None:
    total = 8 * 1024 * 1024
    piece = b"z" * 4096

    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200, "application/octet-stream")
        for _ in range(total // len(piece)):
            conn.chunk(piece)
            await conn.drain()
        conn.end()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url(), {}, b"{}")
        await asyncio.sleep(0.3)  # not reading: the client stops reading the socket
        n = 0
        while chunk := await r.read_arrived(1 << 20):  # takes all that is held: the socket must resume
            n += len(chunk)
        assert n == total
        await c.close()


@scenario
async def slow_reader_pauses_the_socket() -> None:
    total = 32 * 1024 * 1024
    piece = b"z" * 65536
    stuck: list[int] = []

    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200, "application/octet-stream")
        for _ in range(total // len(piece)):
            conn.chunk(piece)
            await conn.drain()
        assert conn.transport is not None
        conn.end()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url(), {}, b"{}")
        await asyncio.sleep(0.3)  # not reading: the client must stop reading the socket
        server_conn = next(iter(srv.http.conns))
        assert server_conn.transport is not None
        stuck.append(server_conn.transport.get_write_buffer_size())
        assert stuck[0] > 0  # the server cannot get rid of its bytes: the client stopped reading
        n = 0
        while chunk := await r.readany():
            n += len(chunk)
        assert n == total
        await c.close()


@scenario
async def release_keeps_the_connection_only_if_the_rest_is_short() -> None:
    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200)
        conn.chunk(b"data: [DONE]\n\n")
        if req.path == "/short":
            await asyncio.sleep(0.02)  # the stream's terminator comes a little after its last event
            conn.end()
            return
        for _ in range(1000):  # an endless stream: releasing it cannot keep the connection
            if conn.closed:
                return
            conn.chunk(b"x" * 4096)
            await asyncio.sleep(0.001)

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url("/short"), {}, b"{}")
        assert await r.readany() == b"data: [DONE]\n\n"
        r.release()
        await asyncio.sleep(0.1)
        r = await c.request("POST", srv.url("/short"), {}, b"{}")
        await r.read()
        assert srv.accepted == 1
        r = await c.request("POST", srv.url("/long"), {}, b"{}")
        assert await r.readany() == b"data: [DONE]\n\n"
        r.release()
        with pytest.raises(UpstreamError):
            await r.readany()
        for _ in range(200):
            if c.open_connections == 0:
                break
            await asyncio.sleep(0.01)
        assert c.open_connections == 0  # more than the drain allowance arrived: dropped, not pooled
        await c.close()


# -- failures ------------------------------------------------------------------------------------


@scenario
async def peer_closing_an_idle_connection_is_not_a_failure() -> None:
    async with Server(ok) as srv:
        c = client()
        await (await c.request("POST", srv.url(), {}, b"{}")).read()
        for conn in list(srv.http.conns):
            conn.close()  # FIN on the idle pooled connection
        await asyncio.sleep(0.05)
        r = await c.request("POST", srv.url(), {}, b"{}")
        assert r.status == 200 and await r.read()
        assert srv.accepted == 2
        await c.close()


@scenario
async def reused_connection_is_resent_only_inside_the_keepalive_race() -> None:
    # The race a FIN cannot cover: the upstream drops a kept-alive connection as the next request arrives.
    async def handler(req: Request, conn: Conn) -> None:
        if req.path == "/flaky" and srv.per_conn[conn] > 1:
            conn.abort()
            return
        if req.path == "/always":
            conn.abort()
            return
        if req.path == "/slow-crash":
            await asyncio.sleep(0.5)
            conn.abort()
            return
        await ok(req, conn)

    async with Server(handler) as srv:
        # A generous window, so that a loaded test machine's loop stalls cannot close it.
        c = client(stale_window=5.0)
        await (await c.request("POST", srv.url("/warm"), {}, b"{}")).read()
        r = await c.request("POST", srv.url("/flaky"), {}, b"{}")
        assert r.status == 200 and await r.read()
        assert srv.accepted == 2
        # On a fresh connection the same failure is the upstream's: not retried.
        c2 = client(stale_window=5.0)
        before = len(srv.seen)
        with pytest.raises(UpstreamError):
            await c2.request("POST", srv.url("/always"), {}, b"{}")
        assert len(srv.seen) == before + 1
        # On a reused one it is retried once, then surfaces.
        await (await c2.request("POST", srv.url("/warm"), {}, b"{}")).read()
        before = len(srv.seen)
        with pytest.raises(UpstreamError):
            await c2.request("POST", srv.url("/always"), {}, b"{}")
        assert len(srv.seen) == before + 2
        # Past the race (the default window) the upstream may have been working on the
        # request: sending it again could run it twice, so the failure goes to the caller.
        c3 = client()
        await (await c3.request("POST", srv.url("/warm"), {}, b"{}")).read()
        before = len(srv.seen)
        with pytest.raises(UpstreamError, match="before answering"):
            await c3.request("POST", srv.url("/slow-crash"), {}, b"{}")
        assert len(srv.seen) == before + 1
        for each in (c, c2, c3):
            await each.close()


@scenario
async def reset_mid_body_raises_upstream_error() -> None:
    async def handler(req: Request, conn: Conn) -> None:
        if req.path == "/stream":
            conn.start(200)
            conn.chunk(b"data: first\n\n")
            await asyncio.sleep(0.05)
            conn.abort()
        else:
            conn.write_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
            await asyncio.sleep(0.05)
            conn.close()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url("/stream"), {}, b"{}")
        assert await r.readany() == b"data: first\n\n"
        with pytest.raises(UpstreamError):
            await r.readany()
        r = await c.request("POST", srv.url("/truncated"), {}, b"{}")
        with pytest.raises(UpstreamError):
            await r.read()
        assert c.open_connections == 0
        await c.close()


@scenario
async def malformed_response_raises_upstream_error() -> None:
    async def handler(req: Request, conn: Conn) -> None:
        conn.write_raw(b"NOT HTTP AT ALL\r\n\r\n")

    async with Server(handler) as srv:
        c = client()
        with pytest.raises(UpstreamError):
            await c.request("POST", srv.url(), {}, b"{}")
        await c.close()


@scenario
async def close_mid_stream_disconnects_the_upstream() -> None:
    gone = asyncio.Event()

    async def handler(req: Request, conn: Conn) -> None:
        conn.start(200)
        while not conn.closed:
            conn.chunk(b"data: tick\n\n")
            await asyncio.sleep(0.01)
        gone.set()

    async with Server(handler) as srv:
        c = client()
        r = await c.request("POST", srv.url(), {}, b"{}")
        assert await r.readany() == b"data: tick\n\n"
        r.close()
        await asyncio.wait_for(gone.wait(), 2)
        assert c.open_connections == 0
        # The pool is still usable afterwards.
        srv.http.handler = lambda req, conn: ok(req, conn)  # type: ignore[assignment]
        assert (await c.request("POST", srv.url(), {}, b"{}")).status == 200
        await c.close()


@scenario
async def cancelled_request_drops_its_connection() -> None:
    gone = asyncio.Event()

    async def handler(req: Request, conn: Conn) -> None:
        for _ in range(500):  # no answer: wait (bounded) for the client to hang up
            if conn.closed:
                gone.set()
                return
            await asyncio.sleep(0.01)

    async with Server(handler) as srv:
        c = client()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await c.request("POST", srv.url(), {}, b"{}")
        await asyncio.wait_for(gone.wait(), 2)
        assert c.open_connections == 0
        await c.close()


@scenario
async def pool_limit_is_honoured_under_concurrency() -> None:
    active = 0
    peak = 0

    async def handler(req: Request, conn: Conn) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        await ok(req, conn)

    async with Server(handler) as srv:
        c = client(limit=3)

        async def one(i: int) -> bytes:
            async with await c.request("POST", srv.url(f"/{i}"), {}, b"{}") as r:
                return await r.read()

        bodies = await asyncio.gather(*(one(i) for i in range(30)))
        assert len(bodies) == 30 and all(b.startswith(b'{"path"') for b in bodies)
        assert peak == 3
        assert srv.accepted == 3
        assert c.open_connections == 3  # all idle in the pool now
        await c.close()


@scenario
async def connect_refused_and_connect_timeout() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = client()
    with pytest.raises(UpstreamConnectError):
        await c.request("POST", f"http://127.0.0.1:{port}/", {}, b"{}")

    # A listener that never accepts, its queue full: the kernel drops further SYNs.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(lsock.getsockname())
        fillers.append(f)
    await asyncio.sleep(0.05)
    slow = client(connect_timeout=0.2)
    t0 = time.perf_counter()
    with pytest.raises(UpstreamConnectTimeout) as e:
        await slow.request("POST", f"http://127.0.0.1:{lsock.getsockname()[1]}/", {}, b"{}")
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, UpstreamError)
    assert 0.15 < time.perf_counter() - t0 < 1.5
    assert slow.open_connections == 0
    for f in fillers:
        f.close()
    lsock.close()
    await c.close()
    await slow.close()


# -- https ---------------------------------------------------------------------------------------


def test_https_round_trip(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)

    async def main() -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        peers: set[Any] = set()

        async def handle(request: web.Request) -> web.Response:
            assert request.transport is not None
            peers.add(request.transport.get_extra_info("peername"))
            return web.json_response({"tls": request.secure, "body": (await request.read()).decode()})

        app = web.Application()
        app.router.add_post("/v1/chat", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        try:
            trusting = HttpClient(4, 2.0, ssl_context=ssl.create_default_context(cafile=str(cert)))
            for _ in range(3):
                async with await trusting.request("POST", f"https://127.0.0.1:{port}/v1/chat", {}, b"hi") as r:
                    assert r.status == 200
                    assert await r.read() == b'{"tls": true, "body": "hi"}'
            assert len(peers) == 1 and trusting.connections_opened == 1
            await trusting.close()
            # Verification is on by default: the system store does not know this certificate.
            default = HttpClient(4, 2.0)
            with pytest.raises(UpstreamConnectError):
                await default.request("POST", f"https://127.0.0.1:{port}/v1/chat", {}, b"hi")
            await default.close()
        finally:
            await runner.cleanup()

    for run in (asyncio.run, uvloop.run):
        run(asyncio.wait_for(main(), 20))


# Defined last: every @scenario above is registered by now.
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, loop: str) -> None:
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(asyncio.wait_for(SCENARIOS[name](), 20))
