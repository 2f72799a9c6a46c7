"""End to end through the official openai SDK: proxy in front of a mock OpenAI upstream."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import simple_config


async def test_non_streaming_answer_and_headers(start_upstream, start_proxy) -> None:
    up = await start_upstream(record=True, api_key="key-a")
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="client-secret-must-not-leak")
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Say hello"}]
    )
    r = raw.parse()
    assert r.choices[0].message.content.startswith("Hello from gpt-4o-mini. You said: Say hello.")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert raw.headers["x-edgeroute-deployment"] == "d-a"
    assert raw.headers["x-edgeroute-route"] == "m"
    assert raw.headers["x-edgeroute-attempts"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-edgeroute-cost-usd"]) > 0
    # The upstream saw the deployment's model and key, never the client's key.
    seen = up.options.requests[-1]
    assert seen["body"]["model"] == "gpt-4o-mini"
    assert seen["headers"]["Authorization"] == "Bearer key-a"
    assert "client-secret-must-not-leak" not in str(seen["headers"])
    await client.close()


async def _answer_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, version: bytes, extra: bytes = b""
) -> tuple[dict[str, str], bytes]:
    """One chat request written by hand (HTTP/`version`), and its answer's headers and body."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "Say hello"}]})
    writer.write(
        b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    assert lines[0] == f"HTTP/{version.decode()} 200 OK", lines[0]
    got = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    return got, await reader.readexactly(int(got["content-length"]))


async def test_an_answer_is_framed_for_each_http_version(start_upstream, start_proxy) -> None:
    """A proxied JSON answer (written as one head and body, without aiohttp's general prepare:
    this pins that speed-up) has its Server, Date, Content-Type and Content-Length headers and
    keeps or closes the connection as HTTP/1.1 and HTTP/1.0 with and without keep-alive ask."""
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # kept alive between them
        got, body = await _answer_head(reader, writer, b"1.1")
        assert orjson.loads(body)["choices"][0]["message"]["content"].startswith("Hello from")
        assert got["server"] == "edgeroute" and got["content-type"] == "application/json" and got["date"]
        assert got["x-edgeroute-deployment"] == "d-a" and "connection" not in got and "transfer-encoding" not in got
    got, _ = await _answer_head(reader, writer, b"1.1", b"Connection: close\r\n")
    assert got["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got, _ = await _answer_head(reader, writer, b"1.0", b"Connection: keep-alive\r\n")
    assert got["connection"].lower() == "keep-alive"
    got, _ = await _answer_head(reader, writer, b"1.0")  # HTTP/1.0 without keep-alive: the last answer
    assert "connection" not in got
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_client_reading_no_answer_is_not_sent_more(start_upstream, start_proxy) -> None:
    """A client pipelining requests and reading none of the answers: once the kernel's buffers
    and the transport's are full, the proxy waits, taking no more of its requests (each one an
    upstream call, paid for, and an answer held in memory). Writing an answer in one piece
    without waiting for the client took all 30 and buffered megabytes."""
    up = await start_upstream(reply_words=150_000, record=True)  # ~1 MB an answer: 30 fill any buffers
    proxy = await start_proxy(simple_config({"a": up}))
    port = int(proxy.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "Say hello"}]})
    one = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, one * 30)  # within the 32 a connection may queue
    try:
        seen = -1
        while seen != len(up.options.requests):  # until the proxy stops taking them
            seen = len(up.options.requests)
            await asyncio.sleep(0.5)
        assert 0 < seen < 30, seen
    finally:
        sock.close()


async def test_streaming_is_relayed_chunk_by_chunk(start_upstream, start_proxy) -> None:
    up = await start_upstream(chunk_interval=0.05, reply_words=10)
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    text = ""
    usage = None
    finish = None
    async for chunk in stream:
        arrivals.append(time.perf_counter() - t0)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    # 10 words at 50 ms each: the upstream needs >= 0.5 s; the first event must arrive long before
    # the last, judged by the stream's own clock (a buffered stream arrives at once; a stalled
    # host delays both ends alike and cannot compress the upstream's 0.45 s of pauses much).
    assert arrivals[-1] - arrivals[0] > 0.25, arrivals
    assert 0.45 < arrivals[-1]
    assert text.startswith("Hello from gpt-4o-mini.")
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == len(text.split(" "))
    await client.close()


async def test_stream_head_goes_out_with_its_first_event(start_upstream, start_proxy, monkeypatch) -> None:
    """The answer's head and its first event leave in one write: sent apart, the first token
    waited for a second system call and the client was woken twice."""
    from edgeroute import http_connection

    writes: list[bytes] = []

    class Recording:
        def __init__(self, transport) -> None:
            self._t = transport

        def write(self, data) -> None:
            writes.append(bytes(data))
            self._t.write(data)

        def writelines(self, chunks) -> None:
            self.write(b"".join(chunks))

        def __getattr__(self, name):
            return getattr(self._t, name)

    made = http_connection.Connection.connection_made

    def recording(self, transport) -> None:
        made(self, Recording(transport))

    monkeypatch.setattr(http_connection.Connection, "connection_made", recording)
    up = await start_upstream(chunk_interval=0.01, reply_words=5)
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Hello from gpt-4o-mini.")
    first = writes[0]
    assert first.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in first
    assert b"data: " in first and b'"content":"Hello' in first
    await client.close()


async def test_stream_without_include_usage_has_no_usage_chunk(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    await client.close()


async def test_models_endpoint(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["m"]
    await client.close()


async def test_unknown_model_is_404(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert "nope" in e.value.message
    rec = proxy.recorder.records[-1]
    assert (rec.status, rec.model) == (404, "nope")  # spend reports show what was asked for
    await client.close()


async def test_missing_messages_is_400(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model="m", messages=[])
    assert "messages" in e.value.message
    await client.close()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b'{"messages":[{"role":"user","content":"x"}]}', 400, "model"),
        (b'{"model":"m","messages":"hi"}', 400, "Invalid type for 'messages': expected an array"),
        (b"[1,2]", 400, "JSON"),
    ],
)
async def test_bad_bodies(start_upstream, start_proxy, body: bytes, status: int, fragment: str) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == status
        err = (await r.json())["error"]
        assert err["type"] == "invalid_request_error"
        assert fragment in err["message"]
        assert "Traceback" not in err["message"]


async def test_body_too_large_is_413(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up}, server={"max_body_bytes": 2048})
    proxy = await start_proxy(cfg)
    big = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 5000 + b'"}]}'
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", data=big, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 413
        assert "too large" in (await r.json())["error"]["message"]


async def test_unknown_path_and_method(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["message"].startswith("Unknown request URL")
        async with s.get(proxy.url + "/v1/chat/completions") as r:
            assert r.status == 405
            assert "error" in await r.json()


async def test_upstream_down_is_502_with_attempt_details(start_upstream, start_proxy) -> None:
    up = await start_upstream(fail_status=500)
    proxy = await start_proxy(simple_config({"a": up}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    body = e.value.body
    assert isinstance(body, dict)
    assert body["code"] == "upstream_failed"
    assert {a["deployment"] for a in body["attempts"]} == {"d-a"}
    await client.close()


async def test_unreachable_upstream_is_502(start_proxy) -> None:
    cfg = {
        "providers": {"gone": {"base_url": "http://127.0.0.1:9/v1", "timeouts": {"connect": 0.5}}},
        "deployments": {"d": {"provider": "gone", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
    }
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    assert "connection failed" in str(e.value.body)
    await client.close()


async def test_upstream_timeout_is_504(start_upstream, start_proxy) -> None:
    up = await start_upstream(latency_ms=10_000)  # far past the 0.2 s timeout: a slow host cannot blur them
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["timeouts"] = {"first_byte": 0.2}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    t0 = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 504
    assert time.perf_counter() - t0 < 8  # by the first-byte timeout, not the upstream's answer
    await client.close()


async def test_health_and_readiness(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["usable_deployments"] == 1
        async with s.get(proxy.url + "/admin/deployments") as r:
            deps = (await r.json())["deployments"]
            assert deps[0]["name"] == "d-a" and deps[0]["circuit"] == "closed"


async def test_concurrent_requests_each_answered_once(start_upstream, start_proxy) -> None:
    a, b = await start_upstream(), await start_upstream()
    proxy = await start_proxy(simple_config({"a": a, "b": b}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    results = await asyncio.gather(
        *[
            client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": f"n{i}"}])
            for i in range(40)
        ]
    )
    served = [r.headers["x-edgeroute-deployment"] for r in results]
    assert served.count("d-a") == 20 and served.count("d-b") == 20  # equal weights, smooth round robin
    assert proxy.recorder.count == 40
    await client.close()


async def test_the_explanation_header_carries_a_rule_name_as_latin_1(start_upstream, start_proxy) -> None:
    """A header value holds latin-1 characters only: in a rule's name past ASCII, a character
    latin-1 has not is a `?` (the others go out as aiohttp writes them); an ASCII explanation
    is as it was."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    cfg["rules"] = [{"name": "über-règle ✓", "when": {"keywords": ["zanzibar"]}, "then": {"route": "m"}}]
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for text, want in (("zanzibar", "rule=über-règle ?; ".encode()), ("hello", b"rule=default; ")):
            body = {"model": "m", "messages": [{"role": "user", "content": text}]}
            async with s.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                explain = dict((k.lower(), v) for k, v in r.raw_headers)[b"x-edgeroute-explain"]
            assert explain.startswith(b"route=m; " + want) and explain.isascii() is (text == "hello")
