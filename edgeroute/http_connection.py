"""One client connection: HTTP/1.1 parsing, the request queue, timeouts, and writing answers.

aiohttp's connection protocol (`web_protocol.RequestHandler`) costs about 70 µs of CPU per
request on top of the application, a fifth of what a proxied request costs in all; most of
it is machinery the proxy does not use (a long-lived task per connection, lingering reads,
upgrades, access-log hooks). This protocol parses with `httptools` (llhttp: strict about
request smuggling: conflicting Content-Length / Transfer-Encoding, bare LF, obsolete line
folding are all refused) and hands aiohttp's own `web.Request` to the application, so the
routes, middleware, signals and responses are aiohttp's, unchanged.

What it guarantees (tests/security/test_hostile_input.py):

- A request's headers must arrive within `server.header_timeout` of the connection opening
  or of the previous answer (slowloris); the connection is closed otherwise.
- Its body within `server.body_timeout` of its headers; the handler's read fails with
  :class:`BodyTimeout` (answered 408).
- A request line or header over `MAX_LINE_BYTES`, or a head over `MAX_HEAD_BYTES`: 431 (a
  chunked body's trailer section over `MAX_HEAD_BYTES`: 400).
  Anything else the parser refuses: 400. Both in OpenAI's JSON format, never quoting the
  request, counted, logged at debug level as one line, and the connection closed after.
- Requests on one connection are answered in order, one at a time (pipelining, at most
  `MAX_PIPELINED` waiting).
- A body sent with `Content-Encoding: gzip | deflate` is decompressed, never past the body
  limit (413); another encoding is a 415.
- A request asking to switch protocols (`Upgrade: h2c`, which Java's HTTP client sends on
  every first request) is answered in its HTTP/1.x version, body and all, as aiohttp does.
- A client that goes away cancels its handler (and so its upstream call); one that takes
  nothing of what waits unsent for `server.send_timeout` is dropped, and so is one shed at
  the connection cap (never left open waiting for a flush).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools
import orjson
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import TimerNoop
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import HttpVersion10, HttpVersion11, StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web import Application, RequestKey
from aiohttp.web import Request as _AiohttpRequest
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from edgeroute import anthropic_api
from edgeroute.errors import ProxyError, error_body

if TYPE_CHECKING:
    from edgeroute.http_server import ProxyServer

log = logging.getLogger("edgeroute.http")

# The limit for the request line and for each header line (aiohttp's default, kept).
MAX_LINE_BYTES = 8190
# The whole head (request line and headers). Small on purpose: the parser joins a header
# that arrives in pieces by copying, so a head trickled a byte at a time costs its size squared.
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 256
# Requests queued behind the one being answered (HTTP/1.1 pipelining, which clients hardly
# use): more is a client flooding one connection, which is closed.
MAX_PIPELINED = 32
# How long a closing connection still reads (and drops) what the client sends, so that the
# client reads its answer before the connection goes (see `Connection._close`).
LINGER_S = 2.0
# A body buffered beyond this is not read from the socket until the handler takes it.
READ_BUFFER_BYTES = 2**16
# Bytes a chunked body may take on the wire beyond the body limit: its framing (a size line
# and CRLF a chunk), an eighth of the limit more, plus this.
CHUNK_FRAMING_BYTES = 2**16
# A body silent this long may be shed at the connection cap (`body_since`); one arriving is not.
BODY_STALL_S = 1.0
# The body reader's timer (none: `server.body_timeout` is the connection's), one for all: it holds nothing.
_NO_TIMER = TimerNoop()
# Linux's `struct tcp_info`, as far as `tcpi_bytes_acked` (what the client's TCP took of the
# answer, the send timer's measure of progress); elsewhere the unsent bytes shrinking is.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_BYTES_ACKED = slice(120, 128)
# Request targets whose URL is kept (see `_url_of`).
URLS_KEPT = 256
_URLS: dict[str, URL] = {}


def _url_of(target: str) -> URL:
    """The URL of an origin-form request target (`/v1/chat/completions?x=1`). Clients send a
    handful of targets, again and again: building one cost about as much as parsing the head's
    headers, so the URLs (immutable) of the targets seen lately are kept, at most `URLS_KEPT`
    (a client sending a new target each time empties them, and is served as before)."""
    url = _URLS.get(target)
    if url is None:
        path, _, query = target.partition("?")
        url = URL.build(path=path, query_string=query, encoded=True)
        if len(_URLS) >= URLS_KEPT:
            _URLS.clear()
        _URLS[target] = url
    return url


class BodyTimeout(HttpProcessingError):
    """A request body that did not arrive within `server.body_timeout` (answered 408)."""

    code = 408
    message = "request body timeout"


class HeadTooLarge(HttpProcessingError):
    """A request line, a header or the whole head over its limit (answered 431)."""

    code = 431
    message = "request head too large"


class MalformedRequest(HttpProcessingError):
    """Bytes the HTTP parser refused (answered 400)."""

    code = 400
    message = "malformed request"


class BodyTooLarge(HttpProcessingError):
    """A chunked body whose bytes on the wire, its framing and chunk extensions with it, pass
    the body limit by more than framing takes (answered 413): extensions are not body, and a
    client sent hundreds of MB of them, parsed at line rate for the whole body timeout."""

    code = 413
    message = "request body too large"


class VersionNotSupported(HttpProcessingError):
    """A request line naming HTTP/2.0 (or another but 1.0, 1.1 and 0.9): answered 505."""

    code = 505
    message = "HTTP version not supported"


def malformed_answer(exc: HttpProcessingError, target: bytes = b"") -> bytes:
    """The whole answer to a request that never parsed: says what kind, never quotes it, closes.
    In Anthropic's error format when the target (as far as it was read) is one of its paths."""
    if isinstance(exc, HeadTooLarge):
        status, reason = 431, "Request Header Fields Too Large"
        msg = f"A request line or header is too long (limit {MAX_LINE_BYTES} bytes, {MAX_HEAD_BYTES} in all)."
    elif isinstance(exc, BodyTooLarge):
        status, reason = 413, "Payload Too Large"
        msg = "The request body is too large (its chunks and their extensions, on the wire)."
    elif isinstance(exc, VersionNotSupported):
        status, reason = 505, "HTTP Version Not Supported"
        msg = "Only HTTP/1.1 and HTTP/1.0 are served."
    else:
        status, reason = 400, "Bad Request"
        msg = "The request could not be parsed as HTTP/1.1 (malformed request line, headers or body)."
    if anthropic_api.anthropic_path(target.partition(b"?")[0].decode("latin-1")):
        error = {"type": anthropic_api.error_type(status), "message": msg}
        body = orjson.dumps({"type": "error", "error": error})
    else:
        body = error_body(status, msg, code="malformed_request")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nServer: edgeroute\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _version(version: str) -> Any:
    """aiohttp's version of a request line's; only 1.1 and 1.0 are served."""
    if version == "1.1":
        return HttpVersion11
    if version == "1.0":
        return HttpVersion10
    if version == "0.9":  # a request line with no version: not HTTP/1.x
        raise MalformedRequest()
    raise VersionNotSupported()


class ContinueReader(StreamReader):
    """The body of a request whose client waits for `100 Continue` (`Expect: 100-continue`):
    told to send it when the handler first waits for the body, so after authentication and
    the size checks. Sent before the application (as aiohttp does), a client without a key
    uploaded a body only to be refused."""

    __slots__ = ("continued",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continued = False

    async def _wait(self, func_name: str) -> None:
        if not self.continued:
            self.continued = True
            transport = self._protocol.transport
            if transport is not None and not transport.is_closing():
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await super()._wait(func_name)


def _expire_body(payload: StreamReader) -> None:
    if not payload.is_eof():
        payload.set_exception(BodyTimeout())  # the handler's read raises; the answer is a 408
        payload.feed_eof()  # and nothing more is read from this request


class Inflate:
    """Decompresses a request body sent with `Content-Encoding: gzip | deflate` into its
    reader, as aiohttp's server does, never past the application's body limit (a small
    compressed body can expand a thousandfold): beyond it the read fails with a 413."""

    def __init__(self, out: StreamReader, encoding: str, limit: int) -> None:
        self.out = out
        self.limit = limit
        self.size = 0
        self.failed = False
        # deflate: zlib-wrapped by the standard, raw from some clients (told apart by the first byte).
        self._sniff = encoding == "deflate"
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS)
        if encoding not in ("gzip", "x-gzip", "deflate"):
            msg = f"Content-Encoding {encoding!r} is not supported (gzip or deflate)."
            self._fail(ProxyError(415, msg, code="unsupported_content_encoding"))

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        if not self.out.is_eof():
            self.out.set_exception(exc)  # the handler's read raises it
            self.out.feed_eof()

    def feed_data(self, chunk: bytes) -> None:
        if self.failed or not chunk:
            return
        if self._sniff:
            self._sniff = False
            if chunk[0] & 0x0F != 8:
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            # At most one byte past the limit: enough to know the body is too large.
            data = self._d.decompress(chunk, self.limit - self.size + 1)
        except zlib.error:
            self._fail(ContentEncodingError("bad compressed body"))
            return
        if self._d.unused_data:
            # Bytes after the end of the compressed stream (garbage, or a second gzip member, which
            # RFC 1952 joins to the first): read as the first part only, the body was another
            # than a reader in front saw. Refused, as a truncated stream is.
            self._fail(ContentEncodingError("bytes after the compressed body"))
            return
        self.size += len(data)
        if self.size > self.limit or self._d.unconsumed_tail:
            self._fail(HTTPRequestEntityTooLarge(max_size=self.limit, actual_size=self.size))
            return
        if data:
            self.out.feed_data(data)

    def feed_eof(self) -> None:
        if self.failed:
            return
        if not self._d.eof:
            self._fail(ContentEncodingError("truncated compressed body"))
            return
        self.out.feed_eof()


class Request(_AiohttpRequest):
    """aiohttp's request, its values (`request[KEY]`) read in one dict lookup: the `Mapping`
    base answers `get` and `in` through `__getitem__` and a KeyError caught when the value is
    absent, ~3,500 instructions where this takes ~400, and a request without a virtual key
    asks for its identity five times."""

    def get(self, key: str | RequestKey[Any], default: Any = None) -> Any:
        return self._state.get(key, default)

    if "_current_app" in getattr(UrlMappingMatchInfo, "__slots__", ()):  # else aiohttp's own property

        @property
        def app(self) -> Application:
            """aiohttp's, without the second property it reads (`match_info.current_app`): asked
            for about ten times a request."""
            match_info = self._match_info
            assert match_info is not None
            app: Application | None = match_info._current_app
            assert app is not None
            return app

    def __contains__(self, key: object) -> bool:
        return key in self._state


class Connection(BaseProtocol):
    """The protocol of one accepted connection (see the module's docstring)."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server.loop)
        self.server = server
        self.app = server.app
        # Read by aiohttp's `BaseRequest` (and its form parser).
        self.ssl_context = None
        self.peername: Any = None
        self.sockname: Any = None
        self.max_field_size = MAX_LINE_BYTES
        self.max_headers = MAX_HEADERS
        self._http = httptools.HttpRequestParser(self)
        self._queue: deque[tuple[RawRequestMessage, StreamReader]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no more requests are read: close once the current answer is out
        self._refused = False  # the parser refused bytes: the client may be sending more
        # A head that asked for a protocol upgrade: (method, target, version, headers), parsed again without it.
        self._upgrade: tuple[bytes, bytes, str, list[tuple[bytes, bytes]]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Armed while bytes wait unsent: paused, after an answer, closing (see `_watch_send`).
        self._send_timer: asyncio.TimerHandle | None = None
        # When the next head must have arrived (None: not waiting for one); `_timer` checks it.
        self._head_deadline: float | None = None
        self._idle_since = 0
        # The body the request being answered waits for, and since when (see `body_since`).
        self._body: StreamReader | None = None
        self._body_since = 0
        # Its bytes when last looked at, and when they last grew (see `body_since`).
        self._body_got = 0
        self._body_heard = 0.0
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._raw: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # bytes received while a head goes on (it may be trickled in pieces)
        self._head_size = 0  # the request line and the headers parsed so far
        self._in_head = False
        self._payload: StreamReader | None = None
        self._inflate: Inflate | None = None  # a compressed body's decompressor, in front of `_payload`
        self._wire_left: int | None = None  # what a chunked body may still take on the wire (see `BodyTooLarge`)
        # Bytes of what may be a trailer section: after a chunk's size line with no data since
        # (-1: it began within the bytes being parsed); None otherwise (see `data_received`).
        self._trailer_bytes: int | None = None

    # -- the transport ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        if not self.server.admit(self):
            self._closing = True
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.server.connections.discard(self)
        super().connection_lost(exc)
        self._closing = True
        self._cancel_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        lost = ConnectionResetError("the client closed the connection")
        if self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(lost)
        for _, payload in self._queue:
            payload.set_exception(lost)
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()  # the client went away: its handler (and upstream call) ends
            self._task = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        in_head = self._in_head
        chunked = self._wire_left is not None
        try:
            self._http.feed_data(data)
            if chunked and self._wire_left is not None:  # a chunked body went on through `data`
                self._wire_left -= len(data)
                if self._wire_left < 0:
                    raise BodyTooLarge()
            if self._trailer_bytes is not None:
                self._count_trailer(len(data))
            if self._task is None and self._queue:
                self._next()  # only once the bytes parsed whole: a request followed by an error is refused
            if self._in_head:  # a head goes on
                if in_head and self._head_bytes >= 0:  # all of `data` was head
                    self._head_bytes += len(data)
                else:  # it began in `data`, after another request's bytes: what of it parsed
                    self._head_bytes = self._head_size
                if self._head_bytes > MAX_HEAD_BYTES:
                    raise HeadTooLarge()
        except (HeadTooLarge, BodyTooLarge) as e:
            self._refuse(e)
            return
        except httptools.HttpParserCallbackError as e:
            self._refuse(e.__context__ if isinstance(e.__context__, HttpProcessingError) else MalformedRequest())
            return
        except httptools.HttpParserUpgrade as e:
            rest = data[int(e.args[0]) :] if e.args else b""
        except httptools.HttpParserError:
            self._refuse(MalformedRequest())
            return
        else:
            return
        # Parsed again outside the handler: an error raised then would have the upgrade, not
        # itself, as its context (a 505 answered as a 400).
        self._decline_upgrade(rest)

    def _count_trailer(self, size: int) -> None:
        """A trailer section (after the last chunk) is headers: the parser joins a field that
        arrives in pieces by copying, so it is held to the head's limit, as a head is (a
        trailer field trickled for the body's wire allowance cost its size squared)."""
        if self._trailer_bytes == -1:  # began within these bytes: what of them is trailer is not known
            self._trailer_bytes = 0
            return
        self._trailer_bytes = (self._trailer_bytes or 0) + size  # all of them: no callback came
        if self._trailer_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge()

    def _decline_upgrade(self, rest: bytes) -> None:
        """A request asked to switch protocols (`Upgrade: h2c`, as Java's HTTP client does on
        every first request, or `websocket`). Nothing is upgraded on this port: as aiohttp
        does, the request is answered in HTTP/1.1 (a client that asked must accept that), so
        its head is parsed again without the upgrade (in its own HTTP version), then its body
        and what follows."""
        if self._upgrade is None:
            self._refuse(MalformedRequest())
            return
        method, url, version, raw = self._upgrade
        self._upgrade = None
        if method == b"CONNECT":  # a tunnel: this is not a forward proxy
            self._refuse(MalformedRequest())
            return
        # In its own version: HTTP/1.0 keeps its framing and close (no chunked answer), 2.0 its 505.
        head = [method + b" " + url + b" HTTP/" + version.encode("ascii") + b"\r\n"]
        for name, value in raw:
            low = name.lower()
            if low in (b"upgrade", b"http2-settings"):
                continue
            if low == b"connection":
                kept = [t for t in value.split(b",") if t.strip().lower() not in (b"upgrade", b"http2-settings")]
                if not kept:
                    continue
                value = b",".join(kept)
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        self._http = httptools.HttpRequestParser(self)
        self.data_received(b"".join(head) + rest)

    def pause_reading(self) -> None:  # called by a full `StreamReader`
        self._reading_paused = True
        self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if not self._buffer_paused:  # not holding a pipelined request (see `on_headers_complete`)
            self._resume_transport_reading()

    def pause_writing(self) -> None:
        """The client stopped reading (the transport's buffer is past its high-water mark).
        An answer it does not read for `server.send_timeout` (nginx's send_timeout: no progress
        for that long) is dropped with its connection: a whole answer waiting here is held in
        memory, counted nowhere, and the connection is never shed."""
        super().pause_writing()
        self._watch_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._closing:
            self._watch_tail()  # no answer to end and watch its tail: the close's last bytes

    def _unsent(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    @property
    def unsent(self) -> int:
        """Bytes written that wait in the transport for the client to take them."""
        return self._unsent()

    def _acked(self) -> int | None:
        """Bytes the client's TCP acknowledged (Linux), None where that is not known."""
        transport = self.transport
        sock = None if transport is None or _TCP_INFO is None else transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _BYTES_ACKED.stop)
        except OSError:
            return None
        return int.from_bytes(info[_BYTES_ACKED], sys.byteorder) if len(info) >= _BYTES_ACKED.stop else None

    def _progress(self) -> int:
        """Grows as the client takes what is sent: what it acknowledged, else (not known) the
        unsent bytes shrinking, which more answers written also grow."""
        acked = self._acked()
        return -self._unsent() if acked is None else acked

    def _watch_send(self) -> None:
        """Bytes wait unsent: the client must take some within `server.send_timeout`. Watched
        below the high-water mark too (an answer's tail, a closing connection's last bytes):
        the kernel's buffers hold megabytes, and a tail the client never reads kept its
        connection open, counted and unsheddable, forever (a close waits for the flush). One
        timer: a watch under way keeps its clock (more answers written are not progress)."""
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self.server.send_timeout, self._send_timer_fired, self._progress())

    def _watch_tail(self) -> None:
        """After an answer (or at a close), watches what is left unsent, if anything."""
        if self._unsent() > 0:
            self._watch_send()

    def _send_timer_fired(self, progress: int) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None or self._unsent() == 0:
            return
        if self._progress() > progress:  # the client took some: another `send_timeout`
            self._watch_send()
            return
        log.info("client %s read nothing for server.send_timeout: connection dropped", self.peername)
        transport.abort()

    # -- parser callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = -1  # began within the bytes being parsed (see `data_received`)
        self._head_size = 0
        self._url = b""
        self._headers = []
        self._raw = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > MAX_LINE_BYTES:
            raise HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_size += size + 4
        if size > MAX_LINE_BYTES or len(self._raw) >= MAX_HEADERS or self._head_size > MAX_HEAD_BYTES:
            raise HeadTooLarge()
        self._raw.append((name, value))
        # As aiohttp does: bytes that are not UTF-8 arrive as lone surrogates, for the code that reads them to refuse.
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_deadline = None  # the header timer, if it fires, finds nothing waiting
        http = self._http
        if http.should_upgrade():
            # The parser stops here and would read what follows as the new protocol, body
            # included: the request is parsed again without its upgrade (`_decline_upgrade`).
            self._upgrade = (http.get_method(), self._url, http.get_http_version(), self._raw)
            self._payload = None
            return
        target = self._url.decode("utf-8", "surrogateescape")
        try:
            if target.startswith("/"):
                url = _url_of(target)
            else:  # absolute-form or asterisk: routed as aiohttp would (to a 404)
                url = URL(target, encoded=True)
                # yarl checks the host and port when first read (aiohttp's request does, later,
                # outside any handler): a bad one (`:99999`, `xn--`) is refused here.
                url.host, url.port  # noqa: B018
        except (ValueError, TypeError):
            raise MalformedRequest() from None
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        version = _version(http.get_http_version())
        # RFC 9112: an HTTP/1.1 request without Host, or any with two, is a 400.
        if (version is HttpVersion11 and "Host" not in headers) or len(headers.getall("Host", ())) > 1:
            raise MalformedRequest()
        should_close = not http.should_keep_alive()
        te = headers.get("Transfer-Encoding")
        chunked = False
        if te is not None:
            if len(headers.getall("Transfer-Encoding")) > 1:
                raise MalformedRequest()  # read whole by the parser, by one header here: one reading only
            # The parser takes only a list ending in `chunked`; a coding before it (`gzip, chunked`)
            # was ignored, its bytes read as the body: no coding but chunked is served (400).
            if te.strip().lower() != "chunked":
                raise MalformedRequest()
            chunked = True
            # RFC 9112 6.1: HTTP/1.0 with Transfer-Encoding: the framing is faulty, close after it.
            should_close = should_close or version is HttpVersion10
        has_body = chunked or headers.get("Content-Length", "0") not in ("0", "")
        if chunked:
            limit = self.app._client_max_size
            self._wire_left = limit + limit // 8 + CHUNK_FRAMING_BYTES
        message = RawRequestMessage(
            http.get_method().decode("ascii", "replace"),
            target,
            version,
            headers,
            tuple(self._raw),
            should_close,
            None,
            False,
            chunked,
            url,
        )
        if has_body:
            waits = version is HttpVersion11 and "Expect" in headers  # any other than 100-continue: a 417
            payload = (ContinueReader if waits else StreamReader)(
                self, READ_BUFFER_BYTES, timer=_NO_TIMER, loop=self._loop
            )
            self._payload = payload
            encoding = headers.get("Content-Encoding", "identity").strip().lower()
            self._inflate = None if encoding == "identity" else Inflate(payload, encoding, self.app._client_max_size)
        else:
            payload = EMPTY_PAYLOAD
            self._payload = self._inflate = None
        if len(self._queue) >= MAX_PIPELINED:
            raise MalformedRequest()
        self._queue.append((message, payload))
        if self._task is not None or len(self._queue) > 1:
            # Pipelined behind a request not yet answered: nothing more is read until its turn
            # (`_next`), or each queued body would be held, unauthenticated and uncounted.
            self._pause_reading_for_buffer()

    def on_chunk_header(self) -> None:
        self._trailer_bytes = -1  # the last chunk's (size 0) is followed by its trailer section

    def on_chunk_complete(self) -> None:
        self._trailer_bytes = None

    def on_body(self, body: bytes) -> None:
        self._trailer_bytes = None  # the chunk had data: not the last one
        if self._inflate is not None:
            self._inflate.feed_data(body)
        elif self._payload is not None:
            self._payload.feed_data(body)

    def on_message_complete(self) -> None:
        self._wire_left = self._trailer_bytes = None
        payload, self._payload = self._payload, None
        inflate, self._inflate = self._inflate, None
        if inflate is not None:
            inflate.feed_eof()
        elif payload is not None and not payload.is_eof():
            payload.feed_eof()

    # -- answering -------------------------------------------------------------

    def _next(self) -> None:
        message, payload = self._queue.popleft()
        if self._send_timer is not None and not self._paused and _TCP_INFO is None:
            # Progress told by the unsent bytes alone: this answer's writes would hide the
            # client's reads. The previous answer's tail is watched from this answer's end.
            self._send_timer.cancel()
            self._send_timer = None
        if self._buffer_paused and not self._queue:
            self._resume_reading_for_buffer()  # nothing left pipelined: this body, and what follows, may come
        self._body = None
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            # The body has `server.body_timeout` to arrive whole (a small one came with its headers).
            timer = self._loop.call_later(self.server.body_timeout, _expire_body, payload)
            payload.on_eof(timer.cancel)
            self._body, self._body_since = payload, next(self.server.idle_starts)
            self._body_got, self._body_heard = payload.total_bytes, self._loop.time()
        self._task = self._loop.create_task(self._answer(message, payload))

    async def _answer(self, message: RawRequestMessage, payload: StreamReader) -> None:
        writer = StreamWriter(self, self._loop)
        task = self._task  # set by `_next` before this coroutine first runs
        assert task is not None
        request: _AiohttpRequest | None = None
        try:
            request = made = self.app._make_request(message, payload, self, writer, task, _cls=Request)  # type: ignore[arg-type]
            resp = await self.server.handle(made)
            if not payload.is_eof() and not resp.prepared:
                resp.force_close()  # its body unread: the stream is out of step, this is the last answer
            await resp.prepare(made)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self._close()
            return
        except Exception:
            # An answer that failed half-way (a handler's stream ended by an error), or a
            # request that could not be made: nothing more can be sent on this connection.
            log.exception("answering %s %s failed", message.method, message.path)
            self._close()
            return
        finally:
            # Whatever happened, the connection is no longer answering: never left "busy"
            # (unshed, undrained, without a header timer) by an exception.
            self._task = None
            self._body = None
            if request is not None:
                request._task = None  # type: ignore[assignment]  # no reference cycle through the task
        if not resp.keep_alive or message.should_close or self._closing or not payload.is_eof():
            # An unread body leaves the stream out of step: close rather than parse it as a
            # request; one cut short (late, shed) may still be coming: linger.
            self._close(linger=self._refused or not payload.is_eof() or payload.exception() is not None)
            return
        self._watch_tail()
        if self._queue:
            self._next()
        else:
            self._arm_header_timer()

    def _refuse(self, exc: HttpProcessingError) -> None:
        """The parser refused the bytes: answer once (unless a handler is answering), then close."""
        self._closing = True
        self._refused = True
        self.server.count_malformed()
        log.debug("malformed request from %s refused (%s)", self.peername, type(exc).__name__)
        payload = self._payload
        if payload is not None and self._task is not None and not payload.is_eof():
            # The body of the request being handled is malformed (e.g. a bad chunk): its read
            # fails (one answer, a 400, from the handler) and the connection closes after it.
            limit = self.app._client_max_size  # a body past the limit on the wire: a 413, as past it in bytes
            payload.set_exception(
                HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1)
                if isinstance(exc, BodyTooLarge)
                else exc
            )
            # Not ended: a handler that read part of the body and found it at its end would take
            # the part for the whole; its next read raises.
            return
        if self._task is not None:
            return  # an answer is being written: it is the last one
        self._queue.clear()  # requests that came with the malformed bytes are not answered
        assert self.transport is not None
        self.transport.write(malformed_answer(exc, self._url))
        self._close(linger=True)

    # -- closing and timers ----------------------------------------------------

    def _close(self, *, linger: bool = False) -> None:
        """Closes the connection. With `linger`, the client may still be sending (a body not
        read, bytes after a malformed head): closing at once would reset the connection and
        the client could lose the answer, so the write side is shut (after the answer) and what
        still arrives is read and dropped for `LINGER_S`."""
        self._closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        if linger and transport.can_write_eof():
            transport.write_eof()
            self._resume_transport_reading()  # what still comes is dropped, not left to reset the connection
            self._timer = self._loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()
        self._watch_tail()  # a close waits for the last bytes to go: not forever (see `_watch_send`)

    def close_idle(self) -> bool:
        """Closes the connection if no request is being answered (a drain); says whether it did."""
        if self._task is None and not self._queue:
            self._close()
            return True
        self._closing = True  # the answer under way is the last one
        return False

    @property
    def idle_since(self) -> int | None:
        """When (in the server's count of idle starts) the connection began waiting for a head;
        None while a request is answered; -1 (shed first) once closing with nothing to answer
        (lingering after a refusal)."""
        if self._task is not None or self._queue:
            return None
        if self._closing:
            return -1
        return None if self._head_deadline is None else self._idle_since

    @property
    def body_since(self) -> int | None:
        """When (in the server's count of idle starts) the request being answered began
        waiting for its body, if no byte of it has come for `BODY_STALL_S`; None if it is not
        waiting (no request, or its body is all here) or its body is coming: an honest upload
        at the cap is not shed for a newcomer (one was, 1.5 s into its 30 s `body_timeout`)."""
        body = self._body
        if body is None or self._closing or self._task is None or body.is_eof():
            return None
        now = self._loop.time()
        if body.total_bytes != self._body_got:
            self._body_got, self._body_heard = body.total_bytes, now
        return self._body_since if now - self._body_heard >= BODY_STALL_S else None

    def shed(self) -> None:
        """Closed to make room at the server's connection cap (see `ProxyServer.admit`): at
        once, bytes still unsent dropped (a close would wait for a client that does not read,
        and leave the connection open past the cap). A request still waiting for its body
        is answered as if its body were late (408), and the connection closed after."""
        if self.body_since is not None and self._body is not None:
            self._closing = True  # nothing more is read; closed once the 408 is out
            _expire_body(self._body)
            return
        self._close()
        if self._unsent() > 0 and self.transport is not None:
            self.transport.abort()

    @property
    def busy(self) -> bool:
        return self._task is not None

    def _arm_header_timer(self) -> None:
        """The next head must arrive within `header_timeout`. One timer per connection checks
        the deadline, moved on when it fires early: not a timer made and cancelled per request."""
        self._head_deadline = self._loop.time() + self.server.header_timeout
        self._idle_since = next(self.server.idle_starts)  # the loop's clock ticks in ms: ties
        if self._timer is None:
            self._timer = self._loop.call_at(self._head_deadline, self._header_timer_fired)

    def _header_timer_fired(self) -> None:
        self._timer = None
        deadline = self._head_deadline
        if deadline is None:
            return  # a request is being answered: the timer is armed again after its answer
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._header_timer_fired)
            return
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
