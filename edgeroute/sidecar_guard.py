"""Keyless sidecar safety: with no keys configured, only local programs may drive the proxy.

A sidecar without keys trusts whoever can reach it. A web page in the user's browser can
reach 127.0.0.1 too: by a cross-site request (CSRF: the browser adds an `Origin` header)
or by DNS rebinding (its own name resolved to 127.0.0.1: the browser sends that name as
`Host`). So when no keys are configured, a request is refused with 403 when it carries an
`Origin` not in `server.allowed_origins` (nor the proxy's own, as its console sends), or a
`Host` that is not a loopback name, the
configured listen host or in `server.allowed_hosts` (any port). SDKs and curl send no
`Origin`. `/admin/*` and `/ui/*` answer loopback clients only, judged by the socket's
peer address: `X-Forwarded-For` and friends are never trusted for this.

The health and metrics endpoints are exempt (probes send the pod's address as `Host`).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from aiohttp import web

from edgeroute import roles
from edgeroute.config import Server
from edgeroute.errors import ProxyError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@lru_cache(maxsize=256)
def host_name(host: str) -> str:
    """The name in a `Host` header, without port, brackets or a trailing dot, lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


@lru_cache(maxsize=256)
def is_loopback(remote: str | None) -> bool:
    """Whether a peer address (the socket's, never a header's) is a loopback address."""
    if not remote:
        return False
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether a listen address (a name or an address; empty means every interface) is loopback only."""
    name = host_name(host)
    return name in LOOPBACK_NAMES or (name != "" and is_loopback(name))


class SidecarGuard:
    """The Host / Origin / loopback checks of one config generation (keyless configs only)."""

    def __init__(self, server: Server) -> None:
        allowed = {host_name(h) for h in server.allowed_hosts}
        self.any_host = "*" in allowed
        self.hosts = frozenset(LOOPBACK_NAMES | {host_name(server.host)} | allowed)
        self.any_origin = "*" in server.allowed_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in server.allowed_origins)

    def check(self, request: web.Request) -> None:
        """Raises 403 for a request a browser page (or a remote client, for admin paths) could have sent."""
        hdrs = request.headers
        origin = hdrs.get("Origin")
        host = hdrs.get("Host")
        if (
            origin is not None
            and not self.any_origin
            and origin.rstrip("/").lower() not in self.origins
            # The proxy's own pages (the console at /ui) post with their own origin; a
            # rebinding page's own origin passes here but its Host is refused below.
            and origin.rstrip("/").lower() != f"{request.scheme}://{host or ''}".lower()
        ):
            raise ProxyError(
                403,
                "Requests from web pages (with an Origin header) are refused when no keys are configured; "
                "add the origin to server.allowed_origins, or configure keys.",
                code="origin_not_allowed",
            )
        if host is not None and not self.any_host and host_name(host) not in self.hosts:
            raise ProxyError(
                403,
                "This Host is not one edgeroute serves when no keys are configured (DNS rebinding); "
                "add it to server.allowed_hosts, or configure keys.",
                code="host_not_allowed",
            )
        if roles.is_admin_path(request.path) and not is_loopback(request.remote):
            raise ProxyError(
                403,
                "Admin endpoints and the web console answer only local clients when no keys are configured; "
                "configure keys (a key of role viewer or above) to use them from another host.",
                code="admin_local_only",
            )
