"""A request as bytes: what a URL means on the wire, and the request head and body encoded.

No I/O here. The body is always sent whole with its real `Content-Length`, so a caller's
`Content-Length` or `Transfer-Encoding` header is dropped; a CR or LF inside a header is
refused rather than let split the request.
"""

from __future__ import annotations

from collections.abc import Mapping

from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}


class Target:
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


# A body up to this size is sent in one write with its head; a larger one is written after it,
# not copied behind it (a copy of megabytes is milliseconds of the event loop's).
JOIN_BYTES = 64 * 1024


# Request heads without their `Content-Length`, by method, target and headers: an adapter
# sends the same few headers to a deployment on every request, so the head is built and
# checked once (~2.5k of the ~4k instructions `encode` took). Bounded: a traced request's
# `traceparent` makes each of its heads new.
_HEADS: dict[tuple[object, ...], bytes] = {}
_HEADS_MAX = 256


def forget(secret: str) -> None:
    """Drops every head that carries `secret` (a provider key rotated or replaced by a reload):
    kept, the old key stayed in memory, in the head and the cache's key, until 256 other heads
    pushed it out. Safe from another thread (a secret's refresh runs in one)."""
    if not secret:
        return
    raw = secret.encode()
    for key, head in list(_HEADS.items()):
        if raw in head:
            _HEADS.pop(key, None)


def encode(method: str, t: Target, headers: Mapping[str, str] | None, body: bytes) -> bytes:
    """The request `method` to `t` with `headers` and `body`, as written to the connection: the
    head and the body, or the head alone when the body is over `JOIN_BYTES` (written next)."""
    key = (method, t.path_qs, t.host_header, *headers.items()) if headers else (method, t.path_qs, t.host_header)
    head = _HEADS.get(key)
    if head is None:
        head = _head(method, t, headers)
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[key] = head
    end = b"Content-Length: %d\r\n\r\n" % len(body) if body or method != "GET" else b"\r\n"
    return b"".join((head, end, body)) if body and len(body) <= JOIN_BYTES else head + end


def _head(method: str, t: Target, headers: Mapping[str, str] | None) -> bytes:
    """The request line and headers, `Content-Length` and the blank line left to `encode`."""
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
    head = "".join(lines)
    # The request line and the headers: anything more means a CR or LF inside a name or value.
    if head.count("\n") != n + 1 or head.count("\r") != n + 1:
        raise ValueError("newline or carriage return in an upstream request header")
    return head.encode("utf-8")
