"""Hostile input at the HTTP level gets a clean 4xx in OpenAI's format, never a 500, a
traceback, a plain-text answer or an echo of what was sent: header bytes of any value,
slowloris (headers or body trickled), request smuggling (CL+TE, duplicate Content-Length,
obfuscated Transfer-Encoding, bad chunks), oversized headers, non-JSON content types."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import openai
import orjson
import pytest

from edgeroute.config import Server
from edgeroute.metrics import METRICS
from tests.security.conftest import Leaky, leaky_config, raw_exchange

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
TOKEN = "tok-0123456789abcdef"


def _keyed(up: Leaky, **server: object) -> dict[str, object]:
    return leaky_config(up, keys={"a": {"token": TOKEN, "role": "admin"}}, server=server)


def _post(extra: bytes, body: bytes = BODY, path: bytes = b"/v1/chat/completions") -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _status_and_error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), answer
    return status, orjson.loads(body)["error"]


@pytest.mark.parametrize(
    "header", [b"Authorization: Bearer \xff\xfe", b"Authorization: Bearer caf\xe9", b"x-api-key: \xe9\xff"]
)
@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/admin/deployments", b"/v1/messages"])
async def test_non_utf8_credentials_are_a_401_not_a_500(leaky: Leaky, serve, header: bytes, path: bytes) -> None:
    """Header bytes of any value: a token that is not UTF-8 is an unknown token (401), on /v1/* and /admin/*."""
    proxy = await serve(_keyed(leaky))
    status, err = _status_and_error(await raw_exchange(proxy.port, _post(header + b"\r\n", path=path)))
    assert status == 401, err


async def test_non_utf8_shared_key_and_tags(leaky: Leaky, serve) -> None:
    """`server.api_keys` compares the raw bytes too; a tags header that is not UTF-8 is a 400."""
    proxy = await serve(leaky_config(leaky, server={"api_keys": [TOKEN]}))
    status, _ = _status_and_error(await raw_exchange(proxy.port, _post(b"Authorization: Bearer \xff\r\n")))
    assert status == 401
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    status, err = _status_and_error(await raw_exchange(proxy.port, _post(auth + b"x-edgeroute-tags: \xff\xfe\r\n")))
    assert status == 400 and "x-edgeroute-tags" in str(err["message"])


async def test_non_utf8_shared_key_at_the_console_sign_in_is_refused_not_a_500(
    leaky: Leaky, serve, caplog: pytest.LogCaptureFixture
) -> None:
    """`/ui/session` (no key needed to call it) compared a shared key as UTF-8: a token that is
    not was a 500 and a traceback in the log for each call. Now it is signed out, as any bad key."""
    proxy = await serve(leaky_config(leaky, server={"api_keys": [TOKEN]}))
    for token in (b"\xff\xfe", TOKEN.encode() + b"\xff"):
        req = b"GET /ui/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
        answer = await raw_exchange(proxy.port, req)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["signed_in"] is False and body["reason"] == "invalid_key"
    req = b"GET /ui/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    body = orjson.loads((await raw_exchange(proxy.port, req)).partition(b"\r\n\r\n")[2])
    assert body["signed_in"] is True and body["auth"] == "shared"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


_P = b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
_G = b"GET /v1/models HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " + TOKEN.encode()


@pytest.mark.parametrize(
    "name, data",
    [
        ("CL+TE", _P + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("duplicate Content-Length", _P + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x"),
        ("obfuscated TE", _P + b"Transfer-Encoding: xchunked\r\n\r\n"),
        ("TE with space", _P + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
        # A coding before chunked was ignored: the bytes a gateway in front would inflate were read as they came.
        ("TE gzip, chunked", _P + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        ("TE chunked, chunked", _P + b"Transfer-Encoding: chunked, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"),
        ("bad chunk size", _P + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
        ("bare LF header", _P + b"X: y\nZ: w\r\nContent-Length: 2\r\n\r\n{}"),
        ("NUL in header", _G + b"\x00\r\n\r\n"),
        ("64 KiB header", _G + b"A" * 65536 + b"\r\n\r\n"),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    ],
)
async def test_request_smuggling_and_malformed_http_get_a_json_4xx(
    leaky: Leaky, serve, caplog: pytest.LogCaptureFixture, name: str, data: bytes
) -> None:
    """Request smuggling / malformed HTTP: refused as a whole (400, 431 for a header over the
    limit) in OpenAI's JSON format, never quoting the line (the token in it), no traceback
    logged, counted in `edgeroute_malformed_requests_total`."""
    proxy = await serve(_keyed(leaky))
    caplog.set_level(logging.DEBUG)
    answer = await raw_exchange(proxy.port, data)
    status, _ = _status_and_error(answer)
    assert status in (400, 431), (name, answer)
    if name == "64 KiB header":
        assert status == 431
    assert TOKEN.encode() not in answer
    assert leaky.seen == []  # nothing reached an upstream
    assert proxy.app[METRICS].malformed_requests == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert TOKEN not in caplog.text


async def test_bad_chunk_after_the_headers_is_one_400_then_close(leaky: Leaky, serve) -> None:
    """A malformed body arriving after the handler started reading: one answer (400), then the connection closes."""
    proxy = await serve(_keyed(leaky))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = _post(b"Authorization: Bearer " + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n", body=b"")
    writer.write(head.replace(b"Content-Length: 0\r\n", b""))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()  # until the server closes
    writer.close()
    assert answer.count(b"HTTP/1.1") == 1, answer
    status, err = _status_and_error(answer)
    assert status == 400 and err["code"] == "malformed_request"


async def test_slowloris_headers_are_cut_off_within_the_header_timeout(leaky: Leaky, serve) -> None:
    """Slowloris: 20 connections each sending its headers one byte a second are all closed
    within `server.header_timeout` (plus scheduling slack), while a normal client is served."""
    timeout = 2.0
    proxy = await serve(leaky_config(leaky, server={"header_timeout": timeout}))
    leaky.mode = "ok"
    line = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(20)]
    started = time.monotonic()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        try:
            for byte in line:
                writer.write(bytes([byte]))
                await writer.drain()
                # Closed by the server: the read sees EOF (or the write fails) at once.
                try:
                    async with asyncio.timeout(1.0):
                        if await reader.read(1024) == b"":
                            break
                except TimeoutError:
                    pass
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
        return time.monotonic() - started

    closed_after = await asyncio.wait_for(asyncio.gather(*(trickle(r, w) for r, w in conns)), 30)
    # Served meanwhile, and after: the proxy is not tied up.
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions", data=BODY, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 200
    assert max(closed_after) < timeout + 4, closed_after
    assert Server().header_timeout <= 30  # the default is well under a minute


async def test_slowloris_body_is_a_408(leaky: Leaky, serve) -> None:
    """A body trickled slower than `server.body_timeout` gets a 408 in OpenAI's format."""
    proxy = await serve(leaky_config(leaky, server={"body_timeout": 0.5}))
    answer = await raw_exchange(proxy.port, _post(b"")[: -len(BODY) + 5])  # headers and 5 bytes of the body
    status, err = _status_and_error(answer)
    assert status == 408 and err["code"] == "body_timeout"
    assert leaky.seen == []
    assert [r.status for r in proxy.recorder.records] == [408]  # recorded as the client's error


@pytest.mark.parametrize(
    "ctype",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/octet-stream"],
)
async def test_non_json_content_types_are_a_415(leaky: Leaky, start_proxy, ctype: str) -> None:
    """Bodies a browser form can send without a CORS preflight (text/plain, forms) are refused."""
    proxy = await start_proxy(leaky_config(leaky))
    leaky.mode = "ok"
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/messages"):
            async with s.post(proxy.url + path, data=BODY, headers={"Content-Type": ctype}) as r:
                assert r.status == 415, await r.text()
                assert "error" in await r.json()
    assert leaky.seen == []


async def test_content_types_are_configurable(leaky: Leaky, start_proxy) -> None:
    proxy = await start_proxy(leaky_config(leaky, server={"accept_content_types": ["application/json", "text/plain"]}))
    leaky.mode = "ok"
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", data=BODY, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 200
        async with s.post(
            proxy.url + "/v1/chat/completions", data=BODY, headers={"Content-Type": "application/json; charset=utf-8"}
        ) as r:
            assert r.status == 200


async def test_the_header_timeout_does_not_cut_a_long_answer_or_a_busy_connection(start_upstream, serve) -> None:
    """The header timeout bounds waiting for headers only: a stream longer than it is served
    whole, and the same connection serves a second request afterwards."""
    from tests.conftest import simple_config

    up = await start_upstream(chunk_interval=0.25, reply_words=8)
    proxy = await serve(simple_config({"a": up}, server={"header_timeout": 1.0}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert len(text.split()) == 8
    await client.close()


async def _answer_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Sends one chat request on an open connection and reads its whole answer; its status."""
    writer.write(_post(b""))
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def test_the_header_timeout_counts_from_the_last_answer(leaky: Leaky, serve) -> None:
    """An idle keep-alive connection has `header_timeout` from its last answer, not from when
    it opened: a request answered late in the first interval leaves it open past the first
    deadline (a second request is served there), and once idle it is closed within the bound."""
    timeout = 1.0
    proxy = await serve(leaky_config(leaky, server={"header_timeout": timeout}))
    leaky.mode = "ok"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        await asyncio.sleep(0.6 * timeout)
        assert await _answer_on(reader, writer) == 200
        await asyncio.sleep(0.7 * timeout)  # past the deadline counted from the connection's opening
        assert await _answer_on(reader, writer) == 200
        answered = time.monotonic()
        async with asyncio.timeout(timeout + 4):
            assert await reader.read(1024) == b""  # closed by the server, with nothing sent
        closed_after = time.monotonic() - answered
        assert 0.8 * timeout < closed_after < timeout + 3, closed_after
    finally:
        writer.close()


READ_HEADERS = [
    b"Authorization", b"x-api-key", b"x-request-id", b"x-edgeroute-tags", b"Content-Type", b"Origin", b"Host",
    b"x-edgeroute-cache", b"Cache-Control", b"traceparent", b"tracestate", b"Accept", b"anthropic-version",
]  # fmt: skip


async def test_header_bytes_of_any_value_never_give_a_500(leaky: Leaky, serve) -> None:
    """Header bytes of any value (Hypothesis: every header the proxy reads, any bytes a header
    may carry, on a keyed and a keyless proxy): a JSON answer below 500, never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaky.mode = "ok"
    value = st.binary(min_size=0, max_size=40).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00").strip())
    samples: list[tuple[bytes, bytes]] = []

    @settings(max_examples=150, suppress_health_check=list(HealthCheck), deadline=None, derandomize=True)
    @given(st.sampled_from(READ_HEADERS), value)
    def collect(name: bytes, v: bytes) -> None:
        samples.append((name, v))

    collect()
    samples += [(n, b"\xff\xfe\xe9") for n in READ_HEADERS]
    for cfg in (_keyed(leaky), leaky_config(leaky)):
        proxy = await serve(cfg)
        auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n" if "keys" in cfg else b""
        for name, v in samples:
            for path in (b"/v1/chat/completions", b"/v1/messages"):
                extra = name + b": " + v + b"\r\n"
                data = _post(extra if name.lower() == b"authorization" else auth + extra, path=path)
                if name == b"Host":  # replace the default Host rather than add a second one
                    data = data.replace(b"Host: 127.0.0.1\r\n", b"", 1)
                if name == b"Content-Type":
                    data = data.replace(b"Content-Type: application/json\r\n", b"", 1)
                answer = await raw_exchange(proxy.port, data)
                status = int(answer.split(b" ", 2)[1])
                assert status < 500, (name, v, answer[:400])
                assert b"Traceback" not in answer
