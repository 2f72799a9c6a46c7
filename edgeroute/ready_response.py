"""A whole answer of ready bytes (a cache hit's, an upstream's JSON answer), prepared without
aiohttp's general path.

`web.Response.prepare` serves every kind of answer: cookies, compression, chunking, payload
objects, bodies that must be empty (HEAD, 204, 304), a Content-Length to check against the
body. A cache hit or a proxied JSON answer is none of these: a 200 to a POST whose body is
bytes in memory. Its head is made here with what aiohttp would add (Content-Length, Date,
the default Server, the Connection header for HTTP/1.0 keep-alive or HTTP/1.1 close) and the
application's `on_response_prepare` signal (the Server header, rate-limit headers) runs as
it would; the head is serialized by aiohttp's own serializer (which refuses a control
character in a header: no header injection) and goes out with the body in one write
straight to the transport: aiohttp's writer would only hold the head, join it to the body
and count bytes (~2.5 % of a hit's instructions on the event loop). `write_eof` then finds
the answer sent. It works under aiohttp's own server as under `http_connection`.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict


class ReadyResponse(web.Response):
    """A 200 answer whose body is `body` (see the module's docstring); `headers` is taken (and
    its Content-Type set), not copied."""

    def __init__(self, body: bytes, headers: dict[str, str], content_type: str) -> None:
        headers[hdrs.CONTENT_TYPE] = content_type
        # `web.Response.__init__` without its checks of what is never passed here (text, a
        # charset, a content type beside the header, a payload object): half its cost, and
        # every attribute it sets set alike (`_compressed_body` is the class's None).
        web.StreamResponse.__init__(self, _real_headers=CIMultiDict(headers))
        self._body = self._ready = body
        self._zlib_executor_size = MAX_SYNC_CHUNK_SIZE
        self._zlib_executor = None

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        writer, keep_alive = bind(self, request)
        self._headers[hdrs.CONTENT_LENGTH] = str(len(self._ready))
        head = _serialize_headers(await head_line(self, request, keep_alive), self._headers)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientConnectionResetError("Cannot write to closing transport")
        transport.write(head + self._ready)  # one write, as aiohttp's writer joins them (Python < 3.12.9)
        self._eof_sent = True  # `write_eof` has nothing left to do
        self._body_length = len(self._ready)
        self._req = self._payload_writer = None
        # Waits while the client does not read (the transport past its high-water mark), as
        # aiohttp's `write_eof` does: without it a client pipelining requests and reading no
        # answer had each one taken, sent upstream and its answer buffered (5 MB in 8 s).
        await writer.drain()
        return writer


def bind(response: web.StreamResponse, request: web.BaseRequest) -> tuple[AbstractStreamWriter, bool]:
    """The start of a `_start` of our own: `response` bound to `request` and its writer, as
    aiohttp's binds it; returns the writer and whether the connection is to be kept."""
    response._req = request
    writer = response._payload_writer = request._payload_writer
    keep_alive = response._keep_alive
    if keep_alive is None:
        keep_alive = response._keep_alive = request.keep_alive
    return writer, keep_alive


async def head_line(response: web.StreamResponse, request: web.BaseRequest, keep_alive: bool) -> str:
    """The Date, default Server and Connection headers added as aiohttp's general `_start`
    adds them, the `on_response_prepare` signal sent; the status line."""
    version = request.version
    headers = response.headers
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if hdrs.CONNECTION not in headers:
        if keep_alive:
            if version == HttpVersion10:
                headers[hdrs.CONNECTION] = "keep-alive"
        elif version == HttpVersion11:
            headers[hdrs.CONNECTION] = "close"
    await request._prepare_hook(response)
    return f"HTTP/{version[0]}.{version[1]} {response.status} {response.reason}"


async def write_head(
    response: web.StreamResponse, request: web.BaseRequest, writer: AbstractStreamWriter, keep_alive: bool
) -> None:
    """The end of a `_start` that aiohttp's general one would have made (`head_line`), the
    head written to `writer` (held there until the body's first bytes, unless sent apart)."""
    await writer.write_headers(await head_line(response, request, keep_alive), response.headers)
