"""Egress through a forward proxy: which upstream connections go through one, and the tunnel.

A provider's `proxy:` setting wins (`direct`: never a proxy); without it the usual
environment variables apply, read when the config loads: `HTTPS_PROXY` for https
upstreams, `HTTP_PROXY` for http ones, `NO_PROXY` (host names, domain suffixes, IPs,
`*`) to bypass. Every connection through a proxy is a CONNECT tunnel (TLS to the
upstream inside it, so the proxy never sees a request or a key). Credentials in a proxy
URL are sent as `Proxy-Authorization: Basic` and never appear in a message: errors name
the proxy by host and port only, and the password is registered with the redactor.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from edgeroute import redact

_MAX_REPLY = 16 * 1024  # a CONNECT reply's headers larger than this are not a proxy's


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization header value, when the URL has credentials

    @property
    def display(self) -> str:
        """How messages name the proxy: host and port, never its credentials."""
        return f"{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """An `http://[user:password@]host[:port]` proxy URL (a scheme-less `host:port` is read as http)."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"proxy URLs must be http:// (a CONNECT proxy), not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("the proxy URL has no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy URL's port is not a number") from None
    auth = None
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        if password:
            redact.register(password)
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        redact.register(auth.split(" ", 1)[1])
    return Proxy(parts.hostname, port, auth)


class Egress:
    """Which proxy (if any) a connection to an upstream host goes through."""

    def __init__(self, explicit: Proxy | None, env: Mapping[str, str]) -> None:
        self.explicit = explicit
        self._env = {k.lower(): v for k, v in env.items() if k.lower().endswith("_proxy") and v}
        self._https = parse_proxy(self._env["https_proxy"]) if "https_proxy" in self._env else None
        self._http = parse_proxy(self._env["http_proxy"]) if "http_proxy" in self._env else None
        self._no_proxy = self._env.get("no_proxy", "")

    @classmethod
    def build(cls, setting: str | None, env: Mapping[str, str] | None = None) -> Egress | None:
        """From a provider's `proxy` setting (a resolved URL, `direct`, or None) and the environment."""
        if setting == "direct":
            return None
        egress = cls(parse_proxy(setting) if setting else None, os.environ if env is None else env)
        return egress if egress.explicit or egress._https or egress._http else None

    def proxy_for(self, host: str, tls: bool) -> Proxy | None:
        if self.explicit is not None:
            return self.explicit
        proxy = self._https if tls else self._http
        if proxy is None:
            return None
        return None if bypassed(host, self._no_proxy) else proxy


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether `NO_PROXY` exempts `host`: `*`, the host itself, or a domain it is under
    (`example.com` and `.example.com` both cover `api.example.com`); a `:port` is ignored."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("[") and "]" in entry:  # [::1]:8080
            entry = entry[1 : entry.index("]")]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.lstrip("*").lstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


class TunnelError(OSError):
    """The proxy could not be reached or refused the tunnel (the message names it by host and port)."""


async def tunnel(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A connected socket to `host:port` through `proxy` (CONNECT), ready for TLS or plain HTTP."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise TunnelError(f"the egress proxy {proxy.display} cannot be resolved ({type(e).__name__})") from None
    sock: socket.socket | None = None
    for family, kind, proto, _, addr in infos:
        candidate = socket.socket(family, kind, proto)
        candidate.setblocking(False)
        try:
            await loop.sock_connect(candidate, addr)
        except OSError:
            candidate.close()
            continue
        sock = candidate
        break
    if sock is None:
        raise TunnelError(f"cannot connect to the egress proxy {proxy.display}")
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if proxy.authorization is not None:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        await loop.sock_sendall(sock, (head + "\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:  # the proxy sends nothing after its reply until we do
            chunk = await loop.sock_recv(sock, 1)
            if not chunk or len(reply) > _MAX_REPLY:
                raise TunnelError(f"the egress proxy {proxy.display} closed the tunnel before answering")
            reply += chunk
        status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or parts[1] != "200":
            shown = redact.text(status_line[:100])
            raise TunnelError(f"the egress proxy {proxy.display} refused the tunnel to {target}: {shown}")
        return sock
    except BaseException:
        sock.close()
        raise
