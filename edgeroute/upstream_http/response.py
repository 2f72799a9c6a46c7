"""An upstream response: its status and headers, its body handed on as it arrives.

The body is buffered up to a high-water mark and reading pauses above it (a client
reading a stream slowly must not make the proxy buffer it all); `release()` drains a
short rest in the background so the connection can be pooled. The connection feeds a
response through its underscored members (`_feed`, `_finish`, `_fail`, ...), never a caller.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType
from typing import Protocol

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from edgeroute.upstream_http.errors import UpstreamError

# Unread bytes of one response above which reading from its socket pauses, and below
# which it resumes.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# What release() reads past the point the caller stopped (e.g. a stream's last chunk after
# its [DONE] event) to keep the connection; a response with more left is closed instead.
_DRAIN_BYTES = 64 * 1024
_DRAIN_S = 1.0


class Carrier(Protocol):
    """What a response needs of the connection it arrives on (`connection.Connection`)."""

    loop: asyncio.AbstractEventLoop
    paused: bool
    resp: Response | None

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def drop(self) -> None: ...


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
        "_fields",
        "_head",
        "_head_data",
        "_headers",
        "_size",
        "_waiter",
        "status",
    )

    def __init__(self, conn: Carrier, head: asyncio.Future[None]) -> None:
        self.status = 0
        self._conn: Carrier | None = conn  # until the whole response arrived or the connection was dropped
        self._head = head
        # The bytes received until the head was whole (some of the body, or of interim heads,
        # with them): its fields are read from them when first asked for (`_raw`).
        self._head_data: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] | None = None
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
    def _raw(self) -> list[tuple[bytes, bytes]]:
        """The head's fields as they came (names and values), read from its bytes on first use.
        The connection's parser hands them over no more: a call into Python for each one cost
        ~1.9k instructions (an OpenAI answer has about twenty), though only a failure's
        `Retry-After` or a stream's end (is its body delimited by the close?) looks at them."""
        if self._fields is None:
            if not self._head.done():
                return []
            self._fields = head_fields(b"".join(self._head_data))
            self._head_data = []
        return self._fields

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (reading the rest waits for nothing)."""
        return self._eof and self._exc is None

    def _arrival(self) -> asyncio.Future[None] | None:
        """With no piece here: a future the next one (or the end, or a failure) sets, None at the
        body's end; raises the failure the response met."""
        if self._exc is not None:
            raise self._exc
        if self._eof:
            return None
        if self._discard >= 0:
            raise UpstreamError("the response was released")
        conn = self._conn
        assert conn is not None
        waiter = self._waiter = conn.loop.create_future()
        return waiter

    async def readany(self) -> bytes:
        """The next body piece as it came off the wire; b"" at the end of the body."""
        while not self._chunks:
            if (waiter := self._arrival()) is None:
                return b""
            await waiter  # left in `_waiter` once done: `_wake` passes a done one by
        data = self._chunks.popleft()
        self._size -= len(data)
        conn = self._conn
        if conn is not None and conn.paused and self._size <= _LOW_WATER:
            conn.resume()
        return data

    async def read_arrived(self, limit: int) -> bytes:
        """`readany`, with the pieces that had arrived behind it joined on, up to about `limit`
        bytes: a stream relays a burst of events (a fast upstream, or a loop that fell behind)
        in one write to its client, not one write and one loop turn an event. It waits itself
        (not through `readany`: a coroutine less an event)."""
        chunks = self._chunks
        while not chunks:
            if (waiter := self._arrival()) is None:
                return b""
            await waiter  # left in `_waiter` once done: `_wake` passes a done one by
        data = chunks.popleft()
        self._size -= len(data)
        if chunks and len(data) < limit:
            parts = [data]
            size = len(data)
            while chunks and size < limit:
                piece = chunks.popleft()
                parts.append(piece)
                size += len(piece)
                self._size -= len(piece)
            data = b"".join(parts)
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


class _Fields:
    """Collects the fields of the final head a response parser reads (its 1xx heads skipped)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:  # a chunked body's trailer is none of the head's
            self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            self.fields = []  # 100 Continue, 103 Early Hints: the answer's own head follows
        else:
            self.done = True


def head_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of the head of the response whose first bytes are `data`, as the connection's
    parser read it (the same parser: names and values alike, however they were split)."""
    got = _Fields()
    try:
        got.parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass  # what follows the head (a body cut here, a protocol switch) is not the head's
    return got.fields
