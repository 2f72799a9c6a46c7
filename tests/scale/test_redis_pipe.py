"""The request path's pipelined Redis connection, against real redis-server processes and
against sockets that misbehave the ways a network does (silence, a hang-up mid-reply)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from edgeroute import redis_client
from edgeroute.redis_pipe import RETRY_AFTER_S, RedisPipe, Script, encode
from tests.serve_support import free_port
from tests.test_cost_support import RedisServer, require_redis


@pytest.fixture
async def pipe() -> AsyncIterator[RedisPipe]:
    p = RedisPipe.shared(require_redis(), 2.0)
    yield p
    await p.close()


def test_encode_is_resp_and_refuses_what_redis_cannot_take() -> None:
    assert encode(("SET", b"k", 5, 0.5)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n0.5\r\n"
    assert encode(["x", "é"]) == "*2\r\n$1\r\nx\r\n$2\r\né\r\n".encode()
    for bad in (True, None, [1], {"a": 1}):
        with pytest.raises(TypeError):
            encode(("SET", "k", bad))


async def test_replies_come_back_to_their_own_callers_in_any_number(pipe: RedisPipe) -> None:
    key = f"edgeroute-pipe-{os.urandom(4).hex()}"
    try:
        got = await asyncio.gather(*(pipe.call("INCRBY", key, i) for i in range(1, 201)))
        # Each caller sees the counter as its own INCRBY left it: the replies were not shuffled.
        assert sorted(got) == [sum(range(1, i + 1)) for i in range(1, 201)]
        assert await pipe.call("GET", key) == str(sum(range(1, 201))).encode()
        assert await pipe.call("GET", key + ":none") is None
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await pipe.call("HGET", key, "f")  # an error reply raises, and the next reply is not lost
        assert await pipe.call("EXISTS", key) == 1
    finally:
        await pipe.call("DEL", key)


async def test_commands_written_soon_go_out_with_the_next_command(pipe: RedisPipe) -> None:
    key = f"edgeroute-pipe-{os.urandom(4).hex()}"
    await pipe.call("PING")  # connected
    assert pipe._proto is not None and pipe._proto.transport is not None
    transport = pipe._proto.transport
    writes: list[bytes] = []
    write = transport.write

    def counted(data: bytes) -> None:
        writes.append(bytes(data))
        write(data)

    transport.write = counted  # type: ignore[method-assign]
    try:
        first = pipe.send(encode(("SET", key, "v")), soon=True)
        second = pipe.send(encode(("GET", key)))
        assert await first == b"OK" and await second == b"v"
        assert len(writes) == 1  # both in one write: one wake-up of Redis
        alone = pipe.send(encode(("DEL", key)), soon=True)
        assert await alone == 1  # nothing followed it: written at the end of the loop pass
    finally:
        transport.write = write  # type: ignore[method-assign]


async def test_scripts_load_themselves_again_after_redis_forgets_them(redis_server: RedisServer) -> None:
    pipe = RedisPipe(redis_server.url, 2.0)
    script = Script.of("return {KEYS[1], ARGV[1] + 1}")
    try:
        assert await pipe.eval(script, ["k"], [41]) == [b"k", 42]
        assert await pipe.call("SCRIPT", "EXISTS", script.sha) == [1]
        await pipe.call("SCRIPT", "FLUSH")
        assert await pipe.eval(script, ["k"], [1]) == [b"k", 2]
        with pytest.raises(ResponseError):
            await pipe.eval(Script.of("return redis.call('NOSUCHCOMMAND')"), [], [])
    finally:
        await pipe.close()


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[int]:
    """A private redis-server that asks for a password; its port."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--requirepass", "s3cret-pw", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    yield port
    proc.kill()
    proc.wait(5)


async def test_a_password_and_a_database_from_the_url(locked_redis: int) -> None:
    port = locked_redis
    good = RedisPipe(f"redis://:s3cret-pw@127.0.0.1:{port}/3", 2.0)
    deadline = time.monotonic() + 10
    while True:
        try:
            await good.call("SET", "k", "in-db-3")
            break
        except redis_client.errors():
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_AFTER_S)
    assert await good.call("GET", "k") == b"in-db-3"
    other = RedisPipe(f"redis://:s3cret-pw@127.0.0.1:{port}/0", 2.0)
    assert await other.call("GET", "k") is None  # SELECT went first: another database
    await other.close()
    bad = RedisPipe(f"redis://:wrong-pw@127.0.0.1:{port}/0", 2.0)
    with pytest.raises(redis_client.errors()) as info:
        await bad.call("GET", "k")
    assert "wrong-pw" not in str(info.value) and "s3cret" not in str(info.value)
    await bad.close()
    await good.close()


async def test_a_refused_connection_fails_fast_then_is_tried_again(redis_server: RedisServer) -> None:
    pipe = RedisPipe(redis_server.url, 2.0)
    assert await pipe.call("PING") == b"PONG"
    redis_server.stop()
    with pytest.raises(redis_client.errors()):
        await pipe.call("PING")  # the connection was lost
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await pipe.call("PING")  # refused, then failing at once while retrying shortly
    assert time.monotonic() - t0 < 2.0  # not one command timeout (2 s) each
    redis_server.start()
    await asyncio.sleep(RETRY_AFTER_S)
    deadline = time.monotonic() + 10
    while True:  # back without anyone restarting the proxy (a loaded host may need another retry)
        try:
            assert await pipe.call("PING") == b"PONG"
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_AFTER_S)
    await pipe.close()


async def _silent_server(hang_up_after: int | None) -> tuple[asyncio.Server, int]:
    """A TCP server that reads and never answers (or hangs up after reading that many bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = 0
        while data := await reader.read(65536):
            seen += len(data)
            if hang_up_after is not None and seen >= hang_up_after:
                writer.write(b"$5\r\nhal")  # half a reply, then gone
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_silent_redis_fails_every_waiting_command_after_the_timeout() -> None:
    server, port = await _silent_server(None)
    pipe = RedisPipe(f"redis://127.0.0.1:{port}/0", 0.2)
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(pipe.call("GET", f"k{i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.15 < time.monotonic() - t0 < 3.0  # all after the one timeout, none hanging
        assert pipe._proto is None  # dropped: a late reply must never meet the next command
    finally:
        await pipe.close()
        server.close()


async def test_a_hang_up_mid_reply_fails_the_waiting_command() -> None:
    server, port = await _silent_server(1)
    pipe = RedisPipe(f"redis://127.0.0.1:{port}/0", 2.0)
    try:
        with pytest.raises(ConnectionError):
            await pipe.call("GET", "k")
        assert not pipe._waiting
    finally:
        await pipe.close()
        server.close()


async def test_a_caller_that_gives_up_does_not_take_another_callers_reply(pipe: RedisPipe) -> None:
    key = f"edgeroute-pipe-{os.urandom(4).hex()}"
    await pipe.call("SET", key, "mine")
    slow = asyncio.ensure_future(pipe.call("BLPOP", key + ":empty", "0.05"))
    await asyncio.sleep(0.01)
    slow.cancel()
    assert await pipe.call("GET", key) == b"mine"
    await pipe.call("DEL", key)


async def test_shared_pipes_are_one_per_url_and_close_with_their_last_user() -> None:
    url = require_redis()
    a = RedisPipe.shared(url, 1.5)
    b = RedisPipe.shared(url, 1.5)
    assert a is b and RedisPipe.shared(url, 1.0) is not a
    await RedisPipe.shared(url, 1.0).close()
    assert await a.call("PING") == b"PONG"
    await a.close()
    assert a._proto is not None  # b still uses it
    await b.close()
    assert a._proto is None
    c = RedisPipe.shared(url, 1.5)
    assert c is not a
    await c.close()
