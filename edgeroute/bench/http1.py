"""A minimal HTTP/1.1 server on `asyncio.Protocol`, for mock and fault-injecting upstreams.

Why not aiohttp's server: the mocks must cost much less than the proxy they stand in
front of, and the fault modes need control that a framework hides (stop listening,
reset a connection with RST mid-stream, stall after some bytes). This module owns
only the wire: parsing requests (Content-Length or chunked bodies, keep-alive,
one request at a time per connection) and writing responses (whole, or chunked for
streams). What to answer is the handler's business.

It is not a general web server: no TLS, no pipelining beyond buffering, no
`Expect: 100-continue`. Clients are the proxy and the tests, on loopback.

:class:`ClientPool` is the matching minimal client, used by the load generator for
plain-HTTP targets (aiohttp's client costs several times more CPU per request).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgeroute.upstream_http.connection import no_delay

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_MAX_HEAD = 64 * 1024


log = logging.getLogger("edgeroute.bench.http1")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


Handler = Callable[[Request, "Conn"], Awaitable[None]]


def _head(status: int, headers: list[tuple[str, str]], extra: str) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1")


class Conn(asyncio.Protocol):
    """One client connection; also the response writer handed to the handler."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.keep_alive = True
        self._paused: asyncio.Future[None] | None = None

    # -- protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        self.server.conns.add(self)
        self.server.connections_accepted += 1
        no_delay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def pause_writing(self) -> None:
        if self._paused is None or self._paused.done():
            self._paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        idx = buf.find(b"\r\n\r\n")
        if idx < 0:
            if len(buf) > _MAX_HEAD:
                self.abort()
            return
        lines = bytes(buf[:idx]).decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self.abort()
            return
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        start = idx + 4
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            parsed = _dechunk(buf, start)
            if parsed is None:
                return
            body, end = parsed
        else:
            n = int(hdrs.get("content-length", "0") or 0)
            end = start + n
            if len(buf) < end:
                return
            body = bytes(buf[start:end])
        del buf[:end]
        conn_hdr = hdrs.get("connection", "").lower()
        keep = conn_hdr != "close" if version == "HTTP/1.1" else conn_hdr == "keep-alive"
        self.keep_alive = keep
        self.busy = True
        req = Request(method, target, hdrs, body, keep)
        asyncio.get_running_loop().create_task(self._run(req))

    async def _run(self, req: Request) -> None:
        try:
            await self.server.handler(req, self)
        except Exception:
            log.exception("handler failed on %s %s", req.method, req.path)
            self.abort()
            return
        self.busy = False
        if self.closed:
            return
        if not self.keep_alive:
            self.close()
        elif self.buf:
            self._next()

    # -- writing -------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """A whole response with Content-Length."""
        if self.closed or self.transport is None:
            return
        h = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if headers:
            h += headers
        if not self.keep_alive:
            h.append(("Connection", "close"))
        self.transport.write(_head(status, h, "") + body)

    def start(
        self, status: int, content_type: str = "text/event-stream", headers: list[tuple[str, str]] | None = None
    ) -> None:
        """Response headers for a chunked body; follow with `chunk` and `end`."""
        if self.closed or self.transport is None:
            return
        h = [("Content-Type", content_type), ("Transfer-Encoding", "chunked"), ("Cache-Control", "no-cache")]
        if headers:
            h += headers
        self.transport.write(_head(status, h, ""))

    def write_raw(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def chunk(self, data: bytes) -> None:
        if data and not self.closed and self.transport is not None:
            self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        if self._paused is not None and not self._paused.done():
            await self._paused

    def close(self) -> None:
        """Closes after flushing (FIN)."""
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Resets the connection (RST, SO_LINGER 0), dropping anything unsent."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()
        self.closed = True


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    out = bytearray()
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
        pos = nl + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            return bytes(out), end + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class HttpServer:
    """Listens on 127.0.0.1 (port 0 picks a free one); can stop and resume listening on the same port."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.conns: set[Conn] = set()
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Conn(self), self.host, self.port, reuse_address=True, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop_listening(self) -> None:
        """New connections are refused (the port is closed); open ones stay."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def reset_connections(self, keep: Conn | None = None) -> None:
        for c in list(self.conns):
            if c is not keep:
                c.abort()

    async def stop(self) -> None:
        self.stop_listening()
        for c in list(self.conns):
            c.close()
        await asyncio.sleep(0)
        self.reset_connections()


# -- client ----------------------------------------------------------------------------------


class _ClientConn(asyncio.Protocol):
    """One keep-alive client connection; parses one response at a time, calling back per socket read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.done: asyncio.Future[int] | None = None
        self.on_head: Callable[[int], None] | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.status = 0
        self.keep = True
        self._state = 0  # 0 head, 1 content-length body, 2 chunked body, 3 body until close
        self._left = 0
        self._chunk_left = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        no_delay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if self._state == 3:
                self._flush()
                self.done.set_result(self.status)
            else:
                self.done.set_exception(ConnectionResetError("server closed the connection mid-response"))

    def send(
        self, data: bytes, on_head: Callable[[int], None], on_data: Callable[[bytes], None]
    ) -> asyncio.Future[int]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.on_head, self.on_data = on_head, on_data
        self._state, self.buf = 0, bytearray()
        self.transport.write(data)
        return self.done

    def _flush(self) -> None:
        if self.buf and self.on_data is not None:
            self.on_data(bytes(self.buf))
        self.buf.clear()

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as e:
            self.done.set_exception(ConnectionError(f"bad response: {e}"))
            self.keep = False

    def _parse(self) -> None:
        assert self.done is not None
        if self._state == 0:
            idx = self.buf.find(b"\r\n\r\n")
            if idx < 0:
                return
            lines = bytes(self.buf[:idx]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            clen, chunked, self.keep = -1, False, True
            for line in lines[1:]:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k == "content-length":
                    clen = int(v)
                elif k == "transfer-encoding" and "chunked" in v.lower():
                    chunked = True
                elif k == "connection" and v.strip().lower() == "close":
                    self.keep = False
            del self.buf[: idx + 4]
            if self.on_head is not None:
                self.on_head(self.status)
            if chunked:
                self._state, self._chunk_left = 2, -1
            elif clen >= 0:
                self._state, self._left = 1, clen
            else:
                self._state, self.keep = 3, False
        if self._state == 1:
            take = min(self._left, len(self.buf))
            if take and self.on_data is not None:
                self.on_data(bytes(self.buf[:take]))
            del self.buf[:take]
            self._left -= take
            if self._left == 0:
                self.done.set_result(self.status)
        elif self._state == 2:
            out = bytearray()
            while True:
                if self._chunk_left < 0:
                    nl = self.buf.find(b"\r\n")
                    if nl < 0:
                        break
                    size = int(bytes(self.buf[:nl]).split(b";")[0], 16)
                    if size == 0:
                        if len(self.buf) < nl + 4:
                            break
                        del self.buf[: nl + 4]
                        if out and self.on_data is not None:
                            self.on_data(bytes(out))
                        self.done.set_result(self.status)
                        return
                    del self.buf[: nl + 2]
                    self._chunk_left = size
                take = min(self._chunk_left, len(self.buf))
                out += self.buf[:take]
                del self.buf[:take]
                self._chunk_left -= take
                if self._chunk_left > 0:
                    break
                if len(self.buf) < 2:
                    self._chunk_left = 0  # expect the CRLF in the next read
                    break
                del self.buf[:2]
                self._chunk_left = -1
            if self._chunk_left == 0 and len(self.buf) >= 2:
                del self.buf[:2]
                self._chunk_left = -1
            if out and self.on_data is not None:
                self.on_data(bytes(out))
        elif self._state == 3:
            self._flush()


class ClientPool:
    """Keep-alive HTTP/1.1 client connections to one host:port (plain HTTP only).

    Several times cheaper per request than aiohttp's client, so that on a small machine
    the generator is not what saturates first. At most `limit` connections (0: no
    limit); beyond it requests wait for a free connection, as behind a client SDK's pool
    (the wait counts in the latency, which runs from the intended send time)."""

    def __init__(self, host: str, port: int, limit: int = 0) -> None:
        self.host, self.port = host, port
        self.limit = limit
        self.idle: list[_ClientConn] = []
        self.opened = 0  # connections opened in total
        self.live = 0  # connections open or being opened now
        self._waiters: collections.deque[asyncio.Future[_ClientConn | None]] = collections.deque()

    async def _acquire(self) -> _ClientConn:
        while True:
            while self.idle:
                c = self.idle.pop()
                if not c.closed:
                    return c
                self.live -= 1
            if not self.limit or self.live < self.limit:
                break
            fut: asyncio.Future[_ClientConn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            got = await fut
            if got is not None and not got.closed:
                return got
            # None: a connection closed, so there is room to open one (or an idle one to take).
        self.live += 1
        try:
            _, proto = await asyncio.get_running_loop().create_connection(_ClientConn, self.host, self.port)
        except BaseException:
            self._discard()
            raise
        self.opened += 1
        return proto

    def _release(self, c: _ClientConn) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(c)
                return
        self.idle.append(c)

    def _discard(self) -> None:
        self.live -= 1
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        on_head: Callable[[int], None],
        on_data: Callable[[bytes], None],
    ) -> int:
        """Sends a request; calls `on_head(status)` at the headers and `on_data(bytes)` per read; returns the status."""
        c = await self._acquire()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        try:
            status = await c.send(data, on_head, on_data)
        except BaseException:
            if c.transport is not None:
                c.transport.abort()
            self._discard()
            raise
        if c.keep and not c.closed:
            self._release(c)
        else:
            if c.transport is not None:
                c.transport.close()
            self._discard()
        return status

    def close(self) -> None:
        for c in self.idle:
            if c.transport is not None:
                c.transport.close()
        self.idle.clear()
