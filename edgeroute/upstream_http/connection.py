"""One keep-alive connection to an upstream: writes a request, parses its response.

An `asyncio.Protocol` with the response parsed by httptools (llhttp), one request at a
time. It goes back to its pool only once its whole response arrived and allowed
keep-alive; one the peer closed is never reused. A reused connection closed before any
response byte, within the pool's `stale_window` of the request being written, fails its
response with `StaleConnection` (the keep-alive race: the client sends it again once);
any other close with UpstreamError; a malformed response or a head over `MAX_HEAD_BYTES` with
UpstreamProtocolError (the upstream's fault).
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable
from typing import Protocol

import httptools

from edgeroute.upstream_http.errors import StaleConnection, UpstreamError, UpstreamProtocolError
from edgeroute.upstream_http.response import Response

# A response head (status line and headers, interim 1xx heads included) larger than this is
# the upstream's protocol error: the parser would hold an endless header line in memory.
MAX_HEAD_BYTES = 64 * 1024


class Pool(Protocol):
    """What a connection tells the pool it belongs to (`client.HttpClient`)."""

    @property
    def stale_window(self) -> float: ...

    def put_idle(self, conn: Connection) -> None:
        """The connection's response completed and it may be used again."""

    def release_slot(self, conn: Connection) -> None:
        """The connection closed: its place under the pool's limit is free."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request/response at a time."""

    def __init__(self, pool: Pool) -> None:
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
        self._fd = -1  # the socket's, to see whether bytes wait unread (see `unread`)

    # -- the exchange ----------------------------------------------------------

    async def send(self, data: bytes, rest: bytes = b"", sent: Callable[[], None] | None = None) -> Response:
        """Writes `data` (and `rest`, a large body sent after its head), calls `sent`, and waits
        for the answer's head."""
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
            raise StaleConnection(msg) if self.reused else UpstreamError(msg)
        self.transport.write(data)
        if rest:
            self.transport.write(rest)
        self.sent_at = self.loop.time()
        if sent is not None:
            sent()
        try:
            await head
        except BaseException:
            # Cancelled (a timeout, a lost hedge) or failed: the connection is mid-exchange, drop it.
            if self.resp is resp:
                self.resp = None
                self.drop()
            raise
        return resp

    def unread(self) -> bool:
        """Whether bytes (or the upstream's close) wait on the idle connection, not yet read by
        the loop: nobody asked for them (a late or extra response), so the connection is out
        of step and the next request would take them for its answer. Asked before reuse."""
        if self._fd < 0:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(0))

    def drop(self) -> None:
        self.open = False
        if self.transport is not None:
            self.transport.abort()
        self.pool.release_slot(self)

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
        sock = no_delay(transport)
        if sock is not None:
            self._fd = sock.fileno()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.resp is None:
            self.drop()  # bytes nobody asked for: the connection's state is unknown
            return
        if not self.resp._head.done():
            self.resp._head_data.append(data)  # its fields are read from them if asked for
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            resp, self.resp = self.resp, None
            self.drop()
            if resp is not None:
                # The upstream's fault (bad framing), not a failed connection: labelled as such.
                resp._fail(UpstreamProtocolError(f"sent a malformed HTTP response ({type(e).__name__})"))
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
        self.pool.release_slot(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp._close_delimited():
            resp._finish()
        elif self.reused and not self.got_bytes and self.loop.time() - self.sent_at <= self.pool.stale_window:
            resp._fail(StaleConnection("a pooled connection was closed by the upstream"))
        elif not resp._head.done():
            resp._fail(UpstreamError(f"the upstream closed the connection before answering ({exc or 'EOF'})"))
        else:
            resp._fail(UpstreamError(f"the upstream closed the connection mid-response ({exc or 'EOF'})"))

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.resp is None:
            self._unsolicited = True

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is None:
            return
        status = self.parser.get_status_code()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows (`head_fields` skips these)
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
            self.pool.put_idle(self)
        else:
            self.drop()


def no_delay(transport: asyncio.BaseTransport) -> socket.socket | None:
    """Small writes (one SSE event, one request) go out at once, not after Nagle's wait.
    Returns the transport's socket, if it has one."""
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return sock
