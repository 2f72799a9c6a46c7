"""A whole answer of ready bytes (a cache hit's), prepared without aiohttp's general path.

`web.Response.prepare` serves every kind of answer: cookies, compression, chunking, payload
objects, bodies that must be empty (HEAD, 204, 304), a Content-Length to check against the
body. A cache hit is none of these: a 200 to a POST whose body is bytes in memory. Its head
is made here with what aiohttp would add (Content-Length, Date, the default Server, the
Connection header for HTTP/1.0 keep-alive or HTTP/1.1 close) and the application's
`on_response_prepare` signal (the Server header, rate-limit headers) runs as it would; the
head goes out with the body in one write (aiohttp's `write_eof`, unchanged). It works under
aiohttp's own server as under `http_connection`.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11


class ReadyResponse(web.Response):
    """A 200 answer whose body is `body` (see the module's docstring); `headers` is taken (and
    its Content-Type set), not copied."""

    def __init__(self, body: bytes, headers: dict[str, str], content_type: str) -> None:
        headers[hdrs.CONTENT_TYPE] = content_type
        super().__init__(body=body, headers=headers)
        self._ready = body

    async def _start(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._req = request
        writer = self._payload_writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        headers = self._headers
        headers[hdrs.CONTENT_LENGTH] = str(len(self._ready))
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
        if hdrs.CONNECTION not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers[hdrs.CONNECTION] = "keep-alive"
            elif version == HttpVersion11:
                headers[hdrs.CONNECTION] = "close"
        await request._prepare_hook(self)
        await writer.write_headers(f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}", headers)
        return writer
