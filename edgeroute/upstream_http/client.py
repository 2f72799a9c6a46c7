"""The pool of keep-alive connections for one provider: `HttpClient`.

At most `limit` connections (open or opening); beyond it a request waits for one to come
back or close, and one idle for longer than `keepalive_timeout` is closed. A request that
meets a stale pooled connection (`StaleConnection`) is sent again, once, on a new one.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Mapping

from yarl import URL

from edgeroute.egress import Egress, TunnelError, tunnel
from edgeroute.upstream_http.connection import Connection
from edgeroute.upstream_http.errors import (
    StaleConnection,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTlsError,
)
from edgeroute.upstream_http.response import Response
from edgeroute.upstream_http.tls import default_context
from edgeroute.upstream_http.wire import JOIN_BYTES, Target, encode

_URL_CACHE_MAX = 1024
# A reused connection's close that arrives this soon after the request was written is
# the keep-alive race (the peer's FIN crossed our request: about one round trip);
# later, the upstream may have started on the request.
STALE_WINDOW_S = 0.3


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
        self._targets: dict[str | URL, Target] = {}
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._conns: set[Connection] = set()
        self._opening = 0
        self._waiters: collections.deque[tuple[tuple[str, str, int], asyncio.Future[Connection | None]]] = (
            collections.deque()
        )
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.connections_opened = 0  # in total, for tests and metrics

    @property
    def open_connections(self) -> int:
        return len(self._conns) + self._opening

    async def request(
        self,
        method: str,
        url: str | URL,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        sent: Callable[[], None] | None = None,
    ) -> Response:
        """Sends one request; returns once the response's status and headers have arrived.
        `sent` is called once the request is written to a connection (before that, a request
        given up on never reached the upstream: nothing of it can have been billed)."""
        t = self._targets.get(url)
        if t is None:
            t = self._target(url)
        data = encode(method, t, headers, body)
        rest = body if len(body) > JOIN_BYTES else b""
        conn = self._take_idle(t)
        if conn is None:
            conn = await self._acquire(t)
        try:
            return await conn.send(data, rest, sent)
        except StaleConnection:
            pass
        conn = await self._acquire(t, reuse=False)
        return await conn.send(data, rest, sent)

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

    def _target(self, url: str | URL) -> Target:
        # yarl normalises (percent-encodes) a string URL the way aiohttp did.
        t = Target(url if isinstance(url, URL) else URL(url))
        if len(self._targets) >= _URL_CACHE_MAX:
            self._targets.clear()
        self._targets[url] = t
        return t

    def _take_idle(self, t: Target) -> Connection | None:
        """A pooled connection to `t` still open and not idle for too long, if any (no await: the hot path)."""
        idle = self._idle.get(t.key)
        if not idle or self._closed:
            return None
        now = idle[-1].loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if conn.open and now - conn.idle_since < self.keepalive_timeout and not conn.unread():
                conn.reused = True
                return conn
            if conn.open:
                conn.drop()  # idle too long, or bytes nobody asked for wait on it
        return None

    async def _acquire(self, t: Target, reuse: bool = True) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise UpstreamError("the upstream client was closed")
            if reuse and (conn := self._take_idle(t)) is not None:
                return conn
            if self.open_connections < self.limit:
                return await self._connect(t)
            fut: asyncio.Future[Connection | None] = loop.create_future()
            self._waiters.append((t.key, fut))
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    # Handed a connection (or a free slot) just as we were cancelled: pass it on.
                    passed = fut.result()
                    if passed is not None:
                        self.put_idle(passed)
                    else:
                        self._wake_one()
                raise
            if got is not None and got.open:
                got.reused = True
                return got
            reuse = True  # a slot came free: take an idle connection if one appeared, else open one

    async def _connect(self, t: Target) -> Connection:
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    proxy = self.egress.proxy_for(t.host, t.tls) if self.egress is not None else None
                    if proxy is not None:
                        sock = await tunnel(proxy, t.host, t.port)
                        ctx = (self._ssl or default_context()) if t.tls else None
                        host = t.host if t.tls else None
                        _, conn = await loop.create_connection(
                            lambda: Connection(self), sock=sock, ssl=ctx, server_hostname=host
                        )
                    elif t.tls:
                        ctx = self._ssl if self._ssl is not None else default_context()
                        _, conn = await loop.create_connection(
                            lambda: Connection(self), t.host, t.port, ssl=ctx, server_hostname=t.host
                        )
                    else:
                        _, conn = await loop.create_connection(lambda: Connection(self), t.host, t.port)
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

    def put_idle(self, conn: Connection) -> None:
        """Takes back `conn`, its response complete: to a waiting request, else idle in the pool."""
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

    def release_slot(self, conn: Connection) -> None:
        """`conn` closed: its place under `limit` goes to a waiting request."""
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
