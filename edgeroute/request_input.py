"""What a request brings before it is decided: its id, its body (read within the server's
limits and checked for depth), the client's own correlation id, its routing tags and the region
its key is held to. Shared by every endpoint; it decides nothing and calls no upstream."""

from __future__ import annotations

import asyncio
import os
import re
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edgeroute import _core, headers
from edgeroute.cost.keys import IDENTITY
from edgeroute.errors import ProxyError, body_read_error
from edgeroute.state import STATE


class _RequestIds:
    """An id is the time in milliseconds (40 bits, 10 hex digits) then 56 random bits, drawn
    from a buffer filled 512 ids at a time. Random, so that a client that saw its own id
    cannot name its neighbours' (feedback, the ledger and the request log are keyed by it;
    a counter allowed that); time first, so that the ledger's and the request log's indexes
    on it take new rows at their right edge: fully random ids land on a random page of each
    index, which made the writer's commits ~2x larger and its CPU per record ~25 % higher on a
    log of 100,000 requests (`python -m edgeroute.bench.requestlog cpu`)."""

    RANDOM_HEX = 14

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.ms = -1
        self.prefix = ""  # "req_" and `ms` in hex: the same for every id of one millisecond

    def take(self) -> str:
        if self.pos >= len(self.buf):
            self.buf, self.pos = os.urandom(self.RANDOM_HEX // 2 * 512).hex(), 0
        pos = self.pos = self.pos + self.RANDOM_HEX
        ms = int(time.time() * 1000) & 0xFF_FFFF_FFFF  # wraps every 34.8 years: only the order is lost
        if ms != self.ms:
            self.ms, self.prefix = ms, f"req_{ms:010x}"
        return self.prefix + self.buf[pos - self.RANDOM_HEX : pos]

    def reset(self) -> None:
        self.buf, self.pos = "", 0  # a forked child must not hand out its parent's ids


_ids = _RequestIds()
os.register_at_fork(after_in_child=_ids.reset)
new_request_id = _ids.take


def tags_of(request: web.Request) -> list[str] | None:
    raw = request.headers.get(headers.TAGS)
    if not raw:
        return None
    if not raw.isascii():
        try:  # header bytes that are not UTF-8 arrive as lone surrogates, which the core cannot take
            raw.encode()
        except UnicodeEncodeError:
            raise ProxyError(400, f"The {headers.TAGS} header is not valid UTF-8.", code="invalid_header") from None
    return [t.strip() for t in raw.split(",") if t.strip()]


def region_of(request: web.Request) -> str | None:
    """The region the caller's key is held to, if any."""
    ident = request.get(IDENTITY)
    return ident.residency if ident is not None else None


async def read_body(request: web.Request) -> bytes:
    """The request body (read within `server.body_timeout`); only the accepted content types
    (`server.accept_content_types`, JSON by default: a browser form cannot send it without a
    CORS preflight). A request without a Content-Type is read as JSON."""
    server = request.app[STATE].live.config.server
    # The raw header, not `request.content_type`, which parses it on every request.
    ctype = request.headers.get("Content-Type")
    if ctype is not None and ctype != "application/json":
        media = ctype.split(";", 1)[0].strip().lower()
        if media not in server.accept_content_types and "*/*" not in server.accept_content_types:
            shown = media[:80].encode("ascii", "backslashreplace").decode("ascii")
            raise ProxyError(
                415,
                f"Unsupported content type '{shown}'; send application/json.",
                code="unsupported_media_type",
            )
    if _BODY in request:
        return request[_BODY]  # read before (the Anthropic path reads it, then hands it to the chat path)
    chunks: list[bytes] = []
    size = 0
    try:
        # `server.body_timeout` bounds it (http_server). The chunks joined once: aiohttp's
        # `read()` grows a bytearray and copies it again, megabytes of the event loop's time.
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > server.max_body_bytes:
                raise ProxyError(
                    413,
                    f"The request body is too large (limit {server.max_body_bytes} bytes).",
                    code="request_too_large",
                )
            chunks.append(chunk)
            if request.content.at_eof():  # all of it (a small body came with its head): no read of b"" to end
                break
    except web.HTTPRequestEntityTooLarge:  # a compressed body past the limit once inflated
        raise ProxyError(
            413, f"The request body is too large (limit {server.max_body_bytes} bytes).", code="request_too_large"
        ) from None
    except HttpProcessingError as e:  # late or malformed: answered (and recorded) as the client's error
        raise body_read_error(e) from None
    body = b"".join(chunks)
    # A large body's scans take milliseconds (the depth scan reads every byte: 20 ms for 10 MB
    # of token ids; a flat object of a million short keys, tens of ms for its keys): they let
    # go of the GIL past a few KiB, so a worker thread keeps the loop serving meanwhile.
    deep, repeated = await asyncio.to_thread(_scans, body) if len(body) > SCAN_ON_LOOP_BYTES else _scans(body)
    if deep:
        raise ProxyError(
            400,
            f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
            code="invalid_request",
        )
    if repeated is not None:
        # Parsers differ on a repeated key (edgeroute's keep the last, some providers' the first):
        # checked by one value and served by the other, such a body is no one's to guess at.
        raise ProxyError(
            400,
            f"The request body repeats the key '{repeated[:200]}' in one object; each key may appear only once.",
            code="duplicate_key",
            param=repeated[:200],
        )
    request[_BODY] = body
    return body


_BODY = web.RequestKey("body", bytes)  # a request's body once read
SCAN_ON_LOOP_BYTES = 64 * 1024  # a larger body's repeated keys are searched in a worker thread


# JSON nested deeper than this is refused (the core's own parser refuses a message nested
# deeper): orjson writes at most 254 levels, so a body of 255 to 1,024 (which it reads) failed
# every re-serialisation (the cache key, a translation, a body sent on) with a 500, and
# Python code walking such a body hit the interpreter's recursion limit.
MAX_JSON_DEPTH = 128


def too_deep(body: bytes) -> bool:
    """Whether the JSON in `body` nests more than `MAX_JSON_DEPTH` levels: a byte scan in the
    core (no parse; a body with tools has hundreds of brackets, parsed and re-written twice
    for this on the event loop before). Asked of the core at once: a count of the brackets in
    Python first cost three times the scan (a `bytes.find` parses its arguments with a format
    string: ~1,500 instructions a call; the bench's 7 kB chat, 15,200 against 5,000)."""
    return _core.Router.nesting_over(body, MAX_JSON_DEPTH)


def _scans(body: bytes) -> tuple[bool, str | None]:
    """Whether `body` nests too deep, else the first key it repeats (or None). One call to
    the core, which remembers bodies found clean: a cache hit's body is compared, not scanned."""
    return _core.Router.body_faults(body, MAX_JSON_DEPTH)


_CORRELATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@\-]{0,127}")


def correlation_id(request: web.Request) -> str | None:
    """The client's own request id (`x-request-id`), when it is a plain token: it is echoed in a
    header and written to logs, so anything that could split a header or a log line is dropped."""
    got = request.headers.get(headers.REQUEST_ID)
    return got if got is not None and _CORRELATION_ID.fullmatch(got) else None
