"""The HTTP/1.1 client for calls to providers: one keep-alive connection pool per provider.

Why not aiohttp's client: on the request hot path it cost about a third of the event
loop's CPU (header preparation, `request_info`, auto headers, `ClientResponse` and its
stream machinery), most of it for features the proxy never uses (cookies, redirects,
compression, proxies, multipart). This client does only what the proxy needs: POST and
GET with an in-memory body, identity response bodies (no `Accept-Encoding` is sent),
one request at a time per connection, on an `asyncio.Protocol` with the responses
parsed by httptools (llhttp, the parser uvicorn uses).

What it keeps:

- at most `limit` connections per client (open or opening); beyond it requests wait
  for one to come back or close;
- a connection goes back to the pool only once its whole response has arrived and the
  response allowed keep-alive; one the peer closed is never reused, and one idle for
  longer than `keepalive_timeout` is closed;
- a request that fails on a *reused* connection before any response byte arrived, and
  within `stale_window` seconds of being written (the peer closed it while idle, and we
  wrote before seeing the FIN), is sent again, once, on a new connection: a stale
  pooled connection is not an upstream failure. A later close may come from an
  upstream that was already working on the request; sending it again could run (and
  bill) it twice, so that is an UpstreamError for the caller's retry policy;
- streamed bytes are handed to the reader as they arrive, one read per body piece,
  never held back to be merged; reading from the socket pauses while a reader lets
  more than `_HIGH_WATER` bytes pile up;
- every transport failure (connect refused or reset, peer gone mid-body, malformed
  response) raises :class:`UpstreamError`, an `OSError`; a connect timeout raises
  :class:`UpstreamConnectTimeout`, which is also a `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
from collections.abc import Mapping
from types import TracebackType

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from edgeroute.egress import Egress, TunnelError, tunnel

# Unread bytes of one response above which reading from its socket pauses, and below
# which it resumes: a client reading a stream slowly must not make the proxy buffer it all.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_URL_CACHE_MAX = 1024
# What release() reads past the point the caller stopped (e.g. a stream's last chunk after
# its [DONE] event) to keep the connection; a response with more left is closed instead.
_DRAIN_BYTES = 64 * 1024
_DRAIN_S = 1.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A response head (status line and headers, interim 1xx heads included) larger than this is
# the upstream's protocol error: the parser would hold an endless header line in memory.
MAX_HEAD_BYTES = 64 * 1024
# A reused connection's close that arrives this soon after the request was written is
# the keep-alive race (the peer's FIN crossed our request: about one round trip);
# later, the upstream may have started on the request.
STALE_WINDOW_S = 0.3


class UpstreamError(OSError):
    """A transport failure talking to an upstream (the request may or may not have been seen)."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, DNS, TLS)."""


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake failed; `reason` says why in words safe to show a client."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


class UpstreamConnectTimeout(UpstreamError, TimeoutError):
    """No connection could be made within the connect timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP in a way it is to blame for (e.g. a head past MAX_HEAD_BYTES);
    the message is safe to show a client."""


class _StaleConnection(UpstreamError):
    """A reused connection failed before any response byte: safe to send again once."""


class _Target:
    """What a URL means on the wire, parsed once per distinct URL."""

    __slots__ = ("host", "host_header", "key", "path_qs", "port", "tls")

    def __init__(self, url: URL) -> None:
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS or not url.raw_host:
            raise ValueError(f"unsupported upstream URL: {url}")
        self.tls = scheme == "https"
        self.host: str = url.raw_host
        self.port: int = url.port or _DEFAULT_PORTS[scheme]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == _DEFAULT_PORTS[scheme] else f"{host}:{self.port}"
        self.path_qs: str = url.raw_path_qs or "/"
        self.key = (scheme, self.host, self.port)


def _encode(method: str, t: _Target, headers: Mapping[str, str] | None, body: bytes) -> bytes:
    lines = [f"{method} {t.path_qs} HTTP/1.1\r\n"]
    has_host = has_accept = False
    n = 0
    if headers:
        for k, v in headers.items():
            low = k.lower()
            if low in ("content-length", "transfer-encoding"):
                continue  # the body is always sent whole, with its real length
            has_host = has_host or low == "host"
            has_accept = has_accept or low == "accept"
            lines.append(f"{k}: {v}\r\n")
            n += 1
    if not has_host:
        lines.insert(1, f"Host: {t.host_header}\r\n")
        n += 1
    if not has_accept:
        lines.append("Accept: */*\r\n")  # what aiohttp sent; some gateways route on its presence
        n += 1
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body)}\r\n")
        n += 1
    lines.append("\r\n")
    head = "".join(lines)
    # Request line, headers and the blank line: anything more means a CR or LF inside a name or value.
    if head.count("\n") != n + 2 or head.count("\r") != n + 2:
        raise ValueError("newline or carriage return in an upstream request header")
    data = head.encode("utf-8")
    return data + body if body else data


class Response:
    """An upstream response: status and headers at once, the body as it arrives.

    `release()` (also on `async with` exit) ends the exchange: the rest of a response
    still arriving is read and discarded in the background (within `_DRAIN_BYTES` and
    `_DRAIN_S`, else the connection is closed) so that its connection can be pooled.
    `close()` drops the connection at once: the upstream sees it closed.
    """

    __slots__ = (
        "_chunks",
        "_conn",
        "_discard",
        "_drain_timer",
        "_eof",
        "_exc",
        "_head",
        "_headers",
        "_raw",
        "_size",
        "_waiter",
        "status",
    )

    def __init__(self, conn: _Conn, head: asyncio.Future[None]) -> None:
        self.status = 0
        self._conn: _Conn | None = conn  # until the whole response arrived or the connection was dropped
        self._head = head
        self._raw: list[tuple[bytes, bytes]] = []
        self._headers: CIMultiDictProxy[str] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._discard = -1  # after release(): how many more body bytes may be thrown away
        self._drain_timer: asyncio.TimerHandle | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        # Built on first use: the hot path (a 200 relayed as is) never looks at them.
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict(
                    (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in self._raw
                )
            )
        return self._headers

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (reading the rest waits for nothing)."""
        return self._eof and self._exc is None

    async def readany(self) -> bytes:
        """The next body piece as it came off the wire; b"" at the end of the body."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            if self._discard >= 0:
                raise UpstreamError("the response was released")
            conn = self._conn
            assert conn is not None
            waiter = self._waiter = conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        conn = self._conn
        if conn is not None and conn.paused and self._size <= _LOW_WATER:
            conn.resume()
        return data

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        if self._eof and self._exc is None:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Ends the exchange, keeping the connection if the rest of the response is short and arrives soon."""
        conn = self._conn
        if conn is None or self._discard >= 0:
            return
        if self._exc is not None or self._close_delimited():
            self.close()
            return
        self._chunks.clear()
        self._size = 0
        self._discard = _DRAIN_BYTES
        self._drain_timer = conn.loop.call_later(_DRAIN_S, self.close)
        conn.resume()

    def close(self) -> None:
        """Closes the connection now unless the whole response already arrived (then it is pooled)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.resp = None
        conn.drop()
        if not self._eof:
            self._fail(UpstreamError("the response was closed before its end"))

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- fed by the connection -----------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        if self._discard >= 0:
            self._discard -= len(data)
            if self._discard < 0:
                self.close()
            return
        self._chunks.append(data)
        self._size += len(data)
        self._wake()
        conn = self._conn
        if self._size > _HIGH_WATER and conn is not None and not conn.paused:
            conn.pause()

    def _finish(self) -> None:
        self._eof = True
        self._conn = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._conn = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if not self._head.done():
            self._head.set_exception(exc)
            return
        if not self._eof and self._exc is None:
            self._exc = exc
            self._wake()

    def _close_delimited(self) -> bool:
        """Whether the body runs until the connection closes (no length, not chunked)."""
        if self.status in (204, 304) or not self._head.done():
            return False
        return not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self._raw)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; carries one request/response at a time."""

    def __init__(self, pool: HttpClient) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.key: tuple[str, str, int] | None = None
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.open = True  # False once either side closed it: never reused after
        self.reused = False
        self.got_bytes = False
        self.sent_at = 0.0
        self.paused = False
        self.idle_since = 0.0
        self.holds_slot = False
        self.head_bytes = 0  # of the response being read, until its head is complete
        self._interim = False  # parsing a 1xx response, which is skipped
        self._unsolicited = False

    # -- the exchange ----------------------------------------------------------

    async def send(self, data: bytes) -> Response:
        assert self.transport is not None
        head: asyncio.Future[None] = self.loop.create_future()
        resp = self.resp = Response(self, head)
        self.got_bytes = False
        self.head_bytes = 0
        if self.transport.is_closing():
            # Closed under us (a reset seen by the loop but not yet reported): like a stale connection.
            self.resp = None
            self.drop()
            msg = "the connection closed before the request was sent"
            raise _StaleConnection(msg) if self.reused else UpstreamError(msg)
        self.transport.write(data)
        self.sent_at = self.loop.time()
        try:
            await head
        except BaseException:
            # Cancelled (a timeout, a lost hedge) or failed: the connection is mid-exchange, drop it.
            if self.resp is resp:
                self.resp = None
                self.drop()
            raise
        return resp

    def drop(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.abort()
        self.pool._release_slot(self)

    def pause(self) -> None:
        if self.transport is not None and self.open:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.transport is not None and self.open:
                self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.resp is None:
            self.drop()  # bytes nobody asked for: the connection's state is unknown
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            resp, self.resp = self.resp, None
            self.drop()
            if resp is not None:
                resp._fail(UpstreamError(f"malformed response from upstream: {e}"))
            return
        if self._unsolicited:
            self.drop()
            return
        resp = self.resp
        if resp is not None and not resp._head.done():
            self.head_bytes += len(data)  # all of it is head: the head would have completed it
            if self.head_bytes > MAX_HEAD_BYTES:
                self.resp = None
                self.drop()
                resp._fail(UpstreamProtocolError(f"sent a response head larger than {MAX_HEAD_BYTES >> 10} KiB"))

    def eof_received(self) -> bool | None:
        self.open = False  # whatever follows, this connection is not reused
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self.pool._release_slot(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp._close_delimited():
            resp._finish()
        elif self.reused and not self.got_bytes and self.loop.time() - self.sent_at <= self.pool.stale_window:
            resp._fail(_StaleConnection("a pooled connection was closed by the upstream"))
        elif not resp._head.done():
            resp._fail(UpstreamError(f"the upstream closed the connection before answering ({exc or 'EOF'})"))
        else:
            resp._fail(UpstreamError(f"the upstream closed the connection mid-response ({exc or 'EOF'})"))

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.resp is None:
            self._unsolicited = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            self.resp._raw.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            resp._raw.clear()
            return
        resp.status = status
        if not resp._head.done():
            resp._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp, self.resp = self.resp, None
        if resp is None:
            return
        resp._finish()
        if self.parser.should_keep_alive() and self.open:
            self.pool._put_idle(self)
        else:
            self.drop()


class HttpClient:
    """A pool of keep-alive HTTP/1.1 connections for one provider (any number of origins).

    `limit` bounds the connections open or opening at once; `connect_timeout` bounds
    opening one (TCP and TLS); idle ones are closed after `keepalive_timeout` seconds.
    `ssl_context` verifies https upstreams (default: the system's trust store, which
    `SSL_CERT_FILE` can replace). `stale_window` is how soon after a request is written a
    reused connection's close still counts as the keep-alive race (and the request is
    sent again).
    """

    def __init__(
        self,
        limit: int,
        connect_timeout: float,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        stale_window: float = STALE_WINDOW_S,
        egress: Egress | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self._ssl = ssl_context
        self.stale_window = stale_window
        self.egress = egress  # a forward proxy for some or all hosts (edgeroute.egress)
        self._targets: dict[str | URL, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._conns: set[_Conn] = set()
        self._opening = 0
        self._waiters: collections.deque[tuple[tuple[str, str, int], asyncio.Future[_Conn | None]]] = (
            collections.deque()
        )
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.connections_opened = 0  # in total, for tests and metrics

    @property
    def open_connections(self) -> int:
        return len(self._conns) + self._opening

    async def request(
        self, method: str, url: str | URL, headers: Mapping[str, str] | None = None, body: bytes = b""
    ) -> Response:
        """Sends one request; returns once the response's status and headers have arrived."""
        t = self._targets.get(url)
        if t is None:
            t = self._target(url)
        data = _encode(method, t, headers, body)
        conn = self._take_idle(t)
        if conn is None:
            conn = await self._acquire(t)
        try:
            return await conn.send(data)
        except _StaleConnection:
            pass
        conn = await self._acquire(t, reuse=False)
        return await conn.send(data)

    async def close(self) -> None:
        """Closes every connection; requests in flight fail with UpstreamError."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(UpstreamError("the upstream client was closed"))
                fut.exception()  # the waiter may be gone: do not warn about it
        self._waiters.clear()
        self._idle.clear()
        for conn in list(self._conns):
            resp, conn.resp = conn.resp, None
            conn.drop()
            if resp is not None:
                resp._fail(UpstreamError("the upstream client was closed"))

    # -- the pool ------------------------------------------------------------------

    def _target(self, url: str | URL) -> _Target:
        # yarl normalises (percent-encodes) a string URL the way aiohttp did.
        t = _Target(url if isinstance(url, URL) else URL(url))
        if len(self._targets) >= _URL_CACHE_MAX:
            self._targets.clear()
        self._targets[url] = t
        return t

    def _take_idle(self, t: _Target) -> _Conn | None:
        """A pooled connection to `t` still open and not idle for too long, if any (no await: the hot path)."""
        idle = self._idle.get(t.key)
        if not idle or self._closed:
            return None
        now = idle[-1].loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if conn.open and now - conn.idle_since < self.keepalive_timeout:
                conn.reused = True
                return conn
            if conn.open:
                conn.drop()
        return None

    async def _acquire(self, t: _Target, reuse: bool = True) -> _Conn:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamError("the upstream client was closed")
            if reuse and (conn := self._take_idle(t)) is not None:
                return conn
            if self.open_connections < self.limit:
                return await self._connect(t)
            fut: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append((t.key, fut))
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    # Handed a connection (or a free slot) just as we were cancelled: pass it on.
                    passed = fut.result()
                    if passed is not None:
                        self._put_idle(passed)
                    else:
                        self._wake_one()
                raise
            if got is not None and got.open:
                got.reused = True
                return got
            reuse = True  # a slot came free: take an idle connection if one appeared, else open one

    async def _connect(self, t: _Target) -> _Conn:
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    proxy = self.egress.proxy_for(t.host, t.tls) if self.egress is not None else None
                    if proxy is not None:
                        sock = await tunnel(proxy, t.host, t.port)
                        ctx = (self._ssl or _default_ssl()) if t.tls else None
                        host = t.host if t.tls else None
                        _, conn = await loop.create_connection(
                            lambda: _Conn(self), sock=sock, ssl=ctx, server_hostname=host
                        )
                    elif t.tls:
                        ctx = self._ssl if self._ssl is not None else _default_ssl()
                        _, conn = await loop.create_connection(
                            lambda: _Conn(self), t.host, t.port, ssl=ctx, server_hostname=t.host
                        )
                    else:
                        _, conn = await loop.create_connection(lambda: _Conn(self), t.host, t.port)
            except TimeoutError as e:
                raise UpstreamConnectTimeout(f"no connection to {t.host}:{t.port} within the timeout") from e
            except ssl.SSLError as e:
                # e.g. "certificate verify failed: self-signed certificate" or "tlsv13 alert certificate required"
                reason = getattr(e, "verify_message", None) or e.reason or "handshake failed"
                if isinstance(e, ssl.SSLCertVerificationError):
                    reason = f"certificate not trusted ({reason})"
                raise UpstreamTlsError(f"TLS to {t.host}:{t.port} failed: {e}", str(reason).lower()) from e
            except TunnelError as e:
                raise UpstreamConnectError(str(e)) from None
            except OSError as e:
                raise UpstreamConnectError(f"cannot connect to {t.host}:{t.port}: {e}") from e
        except BaseException:
            self._opening -= 1
            self._wake_one()  # the slot this attempt held is free again
            raise
        self._opening -= 1
        conn.key = t.key
        conn.holds_slot = True
        self._conns.add(conn)
        self.connections_opened += 1
        if not conn.open or self._closed:
            conn.drop()
            raise UpstreamConnectError(f"the connection to {t.host}:{t.port} closed at once")
        return conn

    def _put_idle(self, conn: _Conn) -> None:
        if self._closed or not conn.open:
            conn.drop()
            return
        conn.resume()
        while self._waiters:
            key, fut = self._waiters.popleft()
            if fut.done():
                continue
            if key == conn.key:
                fut.set_result(conn)
            else:
                # At the limit with a request waiting for another origin: make room for it.
                self._waiters.appendleft((key, fut))
                conn.drop()
            return
        assert conn.key is not None
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.key, []).append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self.keepalive_timeout, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest: float | None = None
        for conns in self._idle.values():
            keep = []
            for c in conns:
                if c.open and now - c.idle_since < self.keepalive_timeout:
                    keep.append(c)
                    oldest = c.idle_since if oldest is None else min(oldest, c.idle_since)
                elif c.open:
                    c.drop()
            conns[:] = keep
        if oldest is not None and not self._closed:
            self._sweep = loop.call_at(oldest + self.keepalive_timeout, self._sweep_idle)

    def _release_slot(self, conn: _Conn) -> None:
        if not conn.holds_slot:
            return
        conn.holds_slot = False
        self._conns.discard(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


_ssl_default: ssl.SSLContext | None = None


def _default_ssl() -> ssl.SSLContext:
    """One verifying context for all providers (loading the trust store costs milliseconds)."""
    global _ssl_default
    if _ssl_default is None:
        _ssl_default = ssl.create_default_context()
    return _ssl_default


def tls_context(
    ca_bundle: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """A verifying context that also trusts `ca_bundle` and presents `client_cert` (mutual TLS).

    Without any of them this is the shared default context. Raises OSError or
    ssl.SSLError for a missing or unreadable file.
    """
    if ca_bundle is None and client_cert is None:
        return _default_ssl()
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=os.path.expanduser(ca_bundle))
    if client_cert is not None:
        key = os.path.expanduser(client_key) if client_key is not None else None
        ctx.load_cert_chain(os.path.expanduser(client_cert), key)
    return ctx


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Small writes (one SSE event, one request) go out at once, not after Nagle's wait."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
