"""edgeroute's HTTP/1.1 connection protocol, seen from a client on a raw socket: pipelined
requests answered in order and once each, a pipelining flood cut off, `Expect:
100-continue`, HTTP/1.0, bodies larger than the limit, a client that goes away mid-request,
and the drain (idle connections closed, a request under way finished)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import zlib

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from edgeroute import config as config_mod
from edgeroute import http_connection
from edgeroute.http_connection import MAX_HEAD_BYTES, MAX_PIPELINED, Request
from edgeroute.http_server import ProxyServer
from edgeroute.server import create_app
from edgeroute.state import STATE
from tests.conftest import ProxyTestServer, simple_config
from tests.security.conftest import Leaky, leaky_config, raw_exchange


def _chat(content: str, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})
    return (
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _answers(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Splits a byte stream of HTTP/1.1 answers (with Content-Length) into (status, head, body)."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
        )
        out.append((int(head.split(b" ", 2)[1]), head, rest[:length]))
        data = rest[length:]
    return out


async def _read_until_closed(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    async with asyncio.timeout(within):
        return await reader.read(-1)


async def test_pipelined_requests_are_answered_in_order_once_each(leaky: Leaky, serve) -> None:
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"".join(_chat(f"question {i}") for i in range(5)) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    data = b""
    async with asyncio.timeout(10):
        while len(_complete_answers(data)) < 6:
            data += await reader.read(65536)
    writer.close()
    answers = _answers(data)
    assert [status for status, _, _ in answers] == [200] * 6
    assert len(leaky.seen) == 5  # each request went upstream once
    assert orjson.loads(answers[-1][2]) == {"status": "ok"}


async def test_each_target_is_its_own_when_urls_are_kept(leaky: Leaky, serve) -> None:
    """The URLs of targets seen lately are kept (building one per request cost as much as
    parsing the headers): a target sent again, or one differing only in its query, is
    routed as its own; a flood of new targets empties what is kept, never grows it."""
    proxy = await serve(leaky_config(leaky))
    targets = [b"/healthz", b"/healthz?probe=1", b"/nope?x=1", b"/healthz"]
    sent = b"".join(b"GET " + t + b" HTTP/1.1\r\nHost: a\r\n\r\n" for t in targets * 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(sent)
    data = b""
    async with asyncio.timeout(10):
        while len(_complete_answers(data)) < 8:
            data += await reader.read(65536)
    writer.close()
    statuses = [status for status, _, _ in _answers(data)]
    assert statuses[:4] == statuses[4:] and statuses[2] in (403, 404), statuses
    assert statuses.count(200) == 6, statuses
    kept = http_connection._url_of("/v1/models?after=a")
    assert http_connection._url_of("/v1/models?after=a") is kept and kept.query["after"] == "a"
    assert http_connection._url_of("/v1/models?after=b").query["after"] == "b"
    for i in range(http_connection.URLS_KEPT * 2):
        assert http_connection._url_of(f"/t{i}").path == f"/t{i}"
    assert len(http_connection._URLS) <= http_connection.URLS_KEPT


def _complete_answers(data: bytes) -> list[tuple[int, bytes, bytes]]:
    try:
        return _answers(data)
    except (StopIteration, ValueError, IndexError):
        return []


async def test_a_pipelining_flood_is_cut_off(leaky: Leaky, serve) -> None:
    """More requests queued on one connection than `MAX_PIPELINED`: the connection is closed
    after the answer under way; nothing beyond it is sent upstream."""
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"".join(_chat("flood") for _ in range(MAX_PIPELINED + 10)))
    data = await _read_until_closed(reader)
    writer.close()
    assert len(leaky.seen) <= MAX_PIPELINED + 1
    assert data.count(b"HTTP/1.1 200") == len(leaky.seen)


async def test_a_head_over_the_limit_is_a_431_whether_sent_whole_or_trickled(leaky: Leaky, serve) -> None:
    """Many headers each under the line limit, over `MAX_HEAD_BYTES` together: a 431 in JSON,
    sent in one write or in small pieces (which the parser joins by copying)."""
    proxy = await serve(leaky_config(leaky))
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 2)
    )
    for pieces in (1, 64):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        step = len(head) // pieces + 1
        try:
            for i in range(0, len(head), step):
                writer.write(head[i : i + step])
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"\r\n")
        except ConnectionError:
            pass
        answer = await _read_until_closed(reader)
        writer.close()
        status, _, body = _answers(answer)[0]
        assert status == 431, answer
        assert orjson.loads(body)["error"]["code"] == "malformed_request"
    assert leaky.seen == []


async def test_an_upgrade_request_is_answered_in_http_1_1(leaky: Leaky, serve) -> None:
    """Java's HTTP client asks every first request on http:// to upgrade to h2c (curl
    --http2 too): nothing is upgraded, the request and its body are answered in HTTP/1.1,
    and the connection serves the next request."""
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(_chat("upgrade me", extra=upgrade) + _chat("and me"))
    data = b""
    async with asyncio.timeout(10):
        while len(_complete_answers(data)) < 2:
            data += await reader.read(65536)
    writer.close()
    assert [status for status, _, _ in _answers(data)] == [200, 200]
    assert [orjson.loads(_answers(data)[i][2])["object"] for i in range(2)] == ["chat.completion"] * 2
    assert len(leaky.seen) == 2
    assert all("Upgrade" not in h and "upgrade" not in h for h in leaky.seen)


_BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def _compressed(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS if encoding == "raw deflate" else zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
async def test_a_compressed_body_is_read(leaky: Leaky, serve, encoding: str) -> None:
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "zipped " * 50}]})
    header = b"Content-Encoding: " + encoding.split()[-1].encode() + b"\r\n"
    request = _chat("", extra=header).split(b"Content-Length:")[0]
    packed = _compressed(encoding, body)
    answer = await raw_exchange(proxy.port, request + b"Content-Length: %d\r\n\r\n" % len(packed) + packed)
    assert _answers(answer)[0][0] == 200, answer
    assert len(leaky.seen) == 1


@pytest.mark.parametrize(
    "name, encoding, packed, status",
    [
        ("a bomb past the body limit", b"gzip", gzip.compress(b"{" + b" " * 2_000_000 + b"}"), 413),
        ("corrupt", b"gzip", b"\x1f\x8b\x08\x00garbage-garbage", 400),
        ("truncated", b"gzip", gzip.compress(b'{"model": "m"}')[:-6], 400),
        # Bytes after the compressed stream were dropped: a body read as its first part only
        # (a gateway in front that joins gzip members, as RFC 1952 reads them, saw another).
        ("bytes after the stream", b"gzip", gzip.compress(_BODY) + b"GARBAGE", 400),
        ("a second gzip member", b"gzip", gzip.compress(_BODY) + gzip.compress(b'{"model": "x"}'), 400),
        ("bytes after a deflate stream", b"deflate", zlib.compress(_BODY) + b"GARBAGE", 400),
        ("unsupported", b"br", b"\x0b\x02\x80{}\x03", 415),
    ],
)
async def test_a_compressed_body_that_cannot_be_read_is_a_clear_4xx(
    leaky: Leaky, serve, name: str, encoding: bytes, packed: bytes, status: int
) -> None:
    proxy = await serve(leaky_config(leaky, server={"max_body_bytes": 65536}))
    request = _chat("", extra=b"Content-Encoding: " + encoding + b"\r\n").split(b"Content-Length:")[0]
    answer = await raw_exchange(proxy.port, request + b"Content-Length: %d\r\n\r\n" % len(packed) + packed)
    got, head, body = _answers(answer)[0]
    assert got == status, (name, answer)
    assert b"application/json" in head.lower() and "error" in orjson.loads(body)
    assert leaky.seen == []
    if status == 413:  # edgeroute's own answer, with its request id (it was aiohttp's, code null)
        assert orjson.loads(body)["error"]["code"] == "request_too_large" and b"x-request-id" in head.lower()


@pytest.mark.parametrize(
    "name, data",
    [
        ("HTTP/1.1 without Host", b"GET /healthz HTTP/1.1\r\n\r\n"),
        ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ],
)
async def test_requests_this_server_does_not_take_are_a_400(leaky: Leaky, serve, name: str, data: bytes) -> None:
    proxy = await serve(leaky_config(leaky))
    status, head, body = _answers(await raw_exchange(proxy.port, data))[0]
    assert status == 400, name
    assert b"application/json" in head.lower() and orjson.loads(body)["error"]["code"] == "malformed_request"


async def test_expect_100_continue_is_honoured(leaky: Leaky, serve) -> None:
    """A client that waits for `100 Continue` before its body (curl does, for bodies over 1 KiB) gets it."""
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    request = _chat("x" * 2000, extra=b"Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head + b"\r\n\r\n")
    async with asyncio.timeout(5):
        interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    async with asyncio.timeout(10):
        answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_expectation_this_server_does_not_meet_is_a_417_in_the_apis_format(
    leaky: Leaky, serve, path: str
) -> None:
    """`Expect: 200-ok` was answered by aiohttp before the application, in plain text quoting the header."""
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    request = _chat("hi", extra=b"Expect: 200-ok\r\n").replace(b"/v1/chat/completions", path.encode(), 1)
    ((status, head, body),) = _answers(await raw_exchange(proxy.port, request))
    assert status == 417
    assert b"application/json" in head.lower() and b"server: edgeroute\r\n" in head.lower()
    err = orjson.loads(body)
    if path == "/v1/messages":
        assert err["type"] == "error" and "100-continue" in err["error"]["message"]
    else:
        assert err["error"]["code"] == "expectation_failed" and "100-continue" in err["error"]["message"]
    assert b"200-ok" not in body


async def test_http_1_0_is_answered_and_closed(leaky: Leaky, serve) -> None:
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(_chat("old client", version=b"1.0"))
    data = await _read_until_closed(reader)  # closed by the server after its answer
    writer.close()
    assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


async def test_a_body_over_the_limit_is_a_413_and_the_connection_closes(leaky: Leaky, serve) -> None:
    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky, server={"max_body_bytes": 4096}))
    answer = await raw_exchange(proxy.port, _chat("y" * 10_000))
    status, head, body = _answers(answer)[0]
    assert status == 413 and b"application/json" in head.lower()
    assert "error" in orjson.loads(body)
    assert leaky.seen == []


async def test_a_client_that_goes_away_ends_its_upstream_call(start_upstream, serve) -> None:
    """The handler is cancelled with the connection: the slow upstream call does not run on."""
    up = await start_upstream(latency_ms=5000)
    proxy = await serve(simple_config({"a": up}))
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(_chat("slow"))
    await asyncio.sleep(0.5)  # the upstream call is under way
    writer.close()
    async with asyncio.timeout(3):  # well before the upstream's 5 s
        while proxy.app[STATE].counters.in_flight:  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.05)


async def test_the_drain_closes_idle_connections_and_finishes_requests_under_way(start_upstream) -> None:
    up = await start_upstream(latency_ms=500)
    app = create_app(config_mod.parse(simple_config({"a": up}), "t.yaml"), "t.yaml")
    served = ProxyTestServer(app)
    await served.start_server()
    assert isinstance(served.server, ProxyServer)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", served.port)
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", served.port)
    busy_w.write(_chat("finish me"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await served.close()
    assert time.monotonic() - started < 5
    assert await _read_until_closed(idle_r, 2) == b""  # closed without an answer
    answer = await _read_until_closed(busy_r, 2)
    assert answer.startswith(b"HTTP/1.1 200")  # the request under way was answered whole
    assert _answers(answer)[0][0] == 200
    idle_w.close()
    busy_w.close()


async def test_mangled_requests_in_any_pieces_never_crash_the_protocol(
    leaky: Leaky, serve, caplog: pytest.LogCaptureFixture
) -> None:
    """Hypothesis: valid requests with bytes flipped, inserted or cut, sent in pieces of any
    size: every answer is well-formed HTTP (or the connection closes), nothing is logged as an
    error, and a normal request on a new connection is still served."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaky.mode = "ok"
    proxy = await serve(leaky_config(leaky, server={"header_timeout": 1.0, "body_timeout": 1.0}))
    seeds = [
        _chat("fuzz"),
        _chat("gz", extra=b"Transfer-Encoding: chunked\r\n"),
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    cases: list[tuple[bytes, list[int]]] = []

    @st.composite
    def mangled(draw: st.DrawFn) -> tuple[bytes, list[int]]:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["flip", "insert", "cut"]))
            if op == "flip" and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif op == "insert":
                data[at:at] = draw(
                    st.sampled_from([b"\r\n", b"\x00", b":", b" ", b"\xff", b"0\r\n\r\n", b"Host: b\r\n"])
                )
            else:
                del data[at : at + draw(st.integers(1, 8))]
        cuts = sorted(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=4)))
        return bytes(data), cuts

    @settings(max_examples=120, suppress_health_check=list(HealthCheck), deadline=None, derandomize=True)
    @given(mangled())
    def collect(case: tuple[bytes, list[int]]) -> None:
        cases.append(case)

    collect()
    caplog.set_level(logging.WARNING)
    for data, cuts in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            last = 0
            for cut in [*cuts, len(data)]:
                writer.write(data[last:cut])
                last = cut
                await asyncio.sleep(0)
            answer = await _read_until_closed(reader, 5) if b"close" in data else await _first_answer(reader)
        except (ConnectionError, TimeoutError):
            answer = b""
        finally:
            writer.close()
        assert answer == b"" or answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (data, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert _answers(await raw_exchange(proxy.port, _chat("still here")))[0][0] == 200


async def _first_answer(reader: asyncio.StreamReader) -> bytes:
    """The first answer's head, or what came before the connection closed (at most 2 s)."""
    try:
        async with asyncio.timeout(2):
            return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        return e.partial
    except TimeoutError:
        return b""


async def test_answers_name_edgeroute_not_its_python_and_aiohttp_versions(start_upstream, start_proxy) -> None:  # type: ignore[no-untyped-def]
    import aiohttp
    import openai

    proxy = await start_proxy(simple_config({"a": await start_upstream()}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    servers = [raw.headers.get("server")]
    async with client.chat.completions.with_streaming_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    ) as streamed:
        servers.append(streamed.headers.get("server"))
    await client.close()
    async with aiohttp.ClientSession() as s:
        for path in ("/nowhere", "/healthz", "/metrics"):
            async with s.get(proxy.url + path) as r:
                servers.append(r.headers.get("Server"))
    assert servers == ["edgeroute"] * 5


def test_a_requests_values_read_as_aiohttps_do() -> None:
    """The protocol's requests read their values in one lookup (`http_connection.Request`):
    absent, given a default, present, and after a clone, as aiohttp's `Mapping` reads them."""
    m = make_mocked_request("POST", "/v1/chat/completions")
    request = Request(m._message, m._payload, m._protocol, m._payload_writer, m._task, m._loop)
    key, other = web.RequestKey("key", int), web.RequestKey("other", int)
    assert request.get(key) is None and request.get(key, 5) == 5 and key not in request
    request[key] = 0
    assert request.get(key) == 0 and request.get(key, 5) == 0 and key in request and other not in request
    clone = request.clone()
    assert clone.get(key) == 0 and key in clone and clone.get(other) is None


async def test_a_body_declared_past_the_limit_is_a_413_before_it_is_sent(leaky: Leaky, serve) -> None:
    """A Content-Length past `server.max_body_bytes` is refused from the head alone: it was read
    up to the limit first (10 MiB of upload and of the event loop by default), so a client that
    sent the head and waited got nothing until the body timeout."""
    proxy = await serve(leaky_config(leaky, server={"max_body_bytes": 65536}))
    request = _chat("").split(b"Content-Length:")[0] + b"Content-Length: 1000000\r\n\r\n" + b'{"model": '
    got, head, body = _answers(await raw_exchange(proxy.port, request, read_timeout=5))[0]
    assert got == 413 and b"application/json" in head.lower(), (head, body)
    assert orjson.loads(body)["error"]["code"] == "request_too_large" and leaky.seen == []
