"""The request path's own Redis connection: one socket, commands pipelined, replies in order.

redis-py's asyncio client spends ~200 µs of CPU per command on this machine (a pool checkout
under a lock, a timeout context per read, a pure-Python encoder and a parser that reads
line by line); a request that admits through a script, looks the cache up and settles later
paid that three times. Here a command is encoded once into bytes, written at once (no
lock: writes on one socket keep their order, and Redis answers in that order), and each
reply is parsed by hiredis (C) and handed to the oldest waiting future — ~40 µs.

Failure is fast and never blocks a request longer than `timeout_s`:
- not connected: the first command connects (AUTH and SELECT go first on the wire);
  commands sent meanwhile wait for it; a failed connect fails them, and commands in the
  next `RETRY_AFTER_S` fail at once instead of trying again;
- a reply later than `timeout_s`: every waiting command fails with `TimeoutError` and the
  socket is dropped (a late reply would be matched to the wrong command otherwise);
- the socket closes: every waiting command fails with `ConnectionError`.
A command that never reached the socket fails with `NotSent` (a `ConnectionError`): only
then does the caller know that Redis did not run it.
A caller cancelled while its command is on the wire does not stop Redis from running it.
Errors are those of `redis_client.errors()`, so callers keep one `except`. Like
`redis_client`, it loads redis-py (for its URL parser and error types) and hiredis only
when a config asks for Redis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

RETRY_AFTER_S = 0.25  # after a failed connect, commands fail at once for this long

Reply = Any  # bytes, int, None or a list of replies


class NotSent(ConnectionError):
    """The command never reached Redis (no connection): sending it again cannot run it twice."""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, sent by its SHA1 (EVALSHA) and by its body only when Redis lacks it."""

    body: bytes
    sha: bytes

    @classmethod
    def of(cls, body: str) -> Script:
        data = body.encode()
        return cls(data, hashlib.sha1(data).hexdigest().encode())


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (str, bytes, int or float arguments)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        t = type(a)  # exact types first: this runs for every argument of every request
        if t is str:
            b = a.encode()
        elif t is bytes:
            b = a
        elif t is int:
            b = b"%d" % a
        elif t is float:
            b = repr(a).encode()  # round-trips exactly; Lua's tonumber reads it
        else:
            b = _other(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _other(a: Any) -> bytes:
    if isinstance(a, bool):
        raise TypeError("a bool is not a Redis argument")  # ambiguous: 1 or "True"?
    if isinstance(a, str | bytes):
        return a.encode() if isinstance(a, str) else bytes(a)
    if isinstance(a, int):
        return b"%d" % a
    if isinstance(a, float):
        return repr(float(a)).encode()
    raise TypeError(f"a {type(a).__name__} is not a Redis argument")


class _Protocol(asyncio.Protocol):
    """Feeds bytes to hiredis and hands each reply to the oldest waiting future."""

    def __init__(self, pipe: RedisPipe) -> None:
        import hiredis

        self.pipe = pipe
        self.reader = hiredis.Reader(replyError=pipe.reply_error)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.pipe._waiting
        while (reply := self.reader.gets()) is not False:
            if not waiting:  # a reply nobody asked for: the stream is out of step
                self.pipe._drop(ConnectionError("Redis sent a reply nobody asked for"))
                return
            fut, _ = waiting.popleft()
            if not fut.done():  # its caller may have given up (cancelled)
                if isinstance(reply, self.pipe.reply_error):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe._lost(self)


class RedisPipe:
    """One pipelined connection to the Redis at `url` (see the module's doc). The request
    path's users (budgets and limits, the response cache) share one through `shared`, so
    that a request's cache lookup and admission script go out in one write."""

    @classmethod
    def shared(cls, url: str, timeout_s: float) -> RedisPipe:
        """The process's pipe to `url`, made on first use; each user calls `close` once."""
        pipe = _SHARED.get((url, timeout_s))
        if pipe is None:
            pipe = _SHARED[(url, timeout_s)] = cls(url, timeout_s)
        pipe._users += 1
        return pipe

    def __init__(self, url: str, timeout_s: float) -> None:
        from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
        from redis.exceptions import ResponseError

        self.timeout_s = timeout_s
        self._url = url
        self.reply_error = ResponseError  # what an error reply raises
        opts = parse_url(url)
        self._host: str = opts.get("host", "localhost")
        self._port: int = int(opts.get("port", 6379))
        self._path: str | None = (
            opts.get("path") if opts.get("connection_class") is UnixDomainSocketConnection else None
        )
        self._tls = opts.get("connection_class") is SSLConnection
        self._hello: list[bytes] = []  # AUTH and SELECT, first on every new connection
        if opts.get("password") is not None:
            user = opts.get("username")
            auth = ("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"])
            self._hello.append(encode(auth))
        if int(opts.get("db", 0) or 0):
            self._hello.append(encode(("SELECT", int(opts["db"]))))
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queued: list[tuple[asyncio.Future[Reply], bytes]] = []  # sent while connecting
        self._failed_at = -RETRY_AFTER_S
        # Commands on the wire, oldest first: (future, deadline on the monotonic clock).
        self._waiting: collections.deque[tuple[asyncio.Future[Reply], float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out: list[bytes] = []  # commands of `send(soon=True)` not written yet
        self._write_soon = False
        self._users = 0  # holders through `shared`

    # -- commands ----------------------------------------------------------------

    async def call(self, *args: Any, soon: bool = False) -> Reply:
        """Runs one command; its reply (an error reply raises `ResponseError`). `soon`: as `send`'s."""
        return await self.send(encode(args), soon=soon)

    async def eval(
        self,
        script: Script,
        keys: list[str],
        args: list[Any],
        soon: bool = False,
        if_abandoned: Callable[[Reply], None] | None = None,
    ) -> Reply:
        """Runs `script` (EVALSHA; loaded with EVAL the first time Redis lacks it).
        `if_abandoned`: called with the reply when it comes, if the caller was cancelled while
        the script was on the wire (Redis runs it anyway: what it took can be given back)."""
        command = encode(["EVALSHA", script.sha, len(keys), *keys, *args])
        for again in (False, True):
            fut = self.send(command, soon=soon)
            try:
                return await (fut if if_abandoned is None else asyncio.shield(fut))
            except asyncio.CancelledError:
                if if_abandoned is not None:
                    fut.add_done_callback(lambda f: _abandoned(f, if_abandoned))
                raise
            except self.reply_error as e:
                if again or not str(e).startswith("NOSCRIPT"):
                    raise
                # Redis restarted or flushed its scripts, so nothing ran: send the body.
                command = encode(["EVAL", script.body, len(keys), *keys, *args])
        raise AssertionError("unreachable")

    def send(self, command: bytes, *, soon: bool = False) -> asyncio.Future[Reply]:
        """Writes an encoded command; the future of its reply (await it within the loop).
        `soon`: held until the next command written now, or the end of this loop pass,
        so that commands issued together reach Redis in one write (one wake-up of Redis)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        if self._loop is not loop:  # first use, or a new event loop (tests): start afresh
            self._reset(loop)
        proto = self._proto
        if proto is not None and proto.transport is not None:
            self._push(fut)
            self._out.append(command)
            if not soon:
                self._write()
            elif not self._write_soon:
                self._write_soon = True
                loop.call_soon(self._write)
        elif time.monotonic() - self._failed_at < RETRY_AFTER_S:
            fut.set_exception(NotSent("Redis is unreachable (retrying shortly)"))
        else:
            self._queued.append((fut, command))
            if self._connecting is None:
                self._connecting = loop.create_task(self._connect())
        return fut

    def _write(self) -> None:
        self._write_soon = False
        if self._out and self._proto is not None and self._proto.transport is not None:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out.clear()
            self._proto.transport.write(data)

    def _push(self, fut: asyncio.Future[Reply]) -> None:
        self._waiting.append((fut, time.monotonic() + self.timeout_s))
        if self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(self.timeout_s, self._check_late)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._path is not None:
                    _, proto = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
                else:
                    tls = ssl.create_default_context() if self._tls else None
                    _, proto = await loop.create_connection(lambda: _Protocol(self), self._host, self._port, ssl=tls)
                assert proto.transport is not None
                self._proto = proto
                hello = [loop.create_future() for _ in self._hello]
                for fut, command in zip(hello, self._hello, strict=True):
                    self._push(fut)
                    self._out.append(command)
                self._write()
                for fut in hello:
                    await fut  # a wrong password or db raises here
        except BaseException as e:
            self._failed_at = time.monotonic()
            error = e if isinstance(e, OSError | TimeoutError) else ConnectionError(f"Redis refused: {e}")
            self._drop(error)
            queued, self._queued = self._queued, []
            for fut, _ in queued:
                if not fut.done():
                    fut.set_exception(NotSent(f"Redis is unreachable: {type(error).__name__}"))
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._connecting = None
        # Through `_out`, behind anything sent since the connection opened: the wire and
        # `_waiting` must keep one order.
        queued, self._queued = self._queued, []
        for fut, command in queued:
            if not fut.done():  # its caller may have given up meanwhile: do not run it later
                self._push(fut)
                self._out.append(command)
        self._write()

    # -- failure ---------------------------------------------------------------

    def _check_late(self) -> None:
        """The oldest command's deadline passed: the connection is too slow to trust."""
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        now = time.monotonic()
        if now >= deadline:
            self._drop(TimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
        else:
            assert self._loop is not None
            self._timer = self._loop.call_later(deadline - now, self._check_late)

    def _lost(self, proto: _Protocol) -> None:
        if proto is self._proto:
            self._drop(ConnectionError("Redis closed the connection"))

    def _drop(self, error: BaseException) -> None:
        """Closes the socket and fails every command waiting on it."""
        proto, self._proto = self._proto, None
        self._out.clear()
        if proto is not None and proto.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nothing to abort
                proto.transport.abort()
        waiting, self._waiting = self._waiting, collections.deque()
        for fut, _ in waiting:
            if not fut.done():
                fut.set_exception(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        self._drop(ConnectionError("a new event loop"))
        self._connecting, self._queued = None, []
        self._write_soon = False  # a write the old loop had scheduled will never run
        self._loop = loop

    async def close(self) -> None:
        """Drops the connection once its last user closes it (a later command connects again)."""
        self._users -= 1
        if self._users > 0:
            return
        if _SHARED.get((self._url, self.timeout_s)) is self:
            del _SHARED[(self._url, self.timeout_s)]
        if self._loop is asyncio.get_running_loop():
            self._drop(ConnectionError("closed"))


_SHARED: dict[tuple[str, float], RedisPipe] = {}


def _abandoned(fut: asyncio.Future[Reply], then: Callable[[Reply], None]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        then(fut.result())
