"""The TLS contexts upstream connections verify with: one shared default, or one per
provider that trusts its own CA bundle or presents a client certificate."""

from __future__ import annotations

import os
import ssl

_default: ssl.SSLContext | None = None


def default_context() -> ssl.SSLContext:
    """One verifying context for all providers (loading the trust store costs milliseconds)."""
    global _default
    if _default is None:
        _default = ssl.create_default_context()
    return _default


def tls_context(
    ca_bundle: str | None = None, client_cert: str | None = None, client_key: str | None = None
) -> ssl.SSLContext:
    """A verifying context that also trusts `ca_bundle` and presents `client_cert` (mutual TLS).

    Without any of them this is the shared default context. Raises OSError or
    ssl.SSLError for a missing or unreadable file.
    """
    if ca_bundle is None and client_cert is None:
        return default_context()
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=os.path.expanduser(ca_bundle))
    if client_cert is not None:
        key = os.path.expanduser(client_key) if client_key is not None else None
        ctx.load_cert_chain(os.path.expanduser(client_cert), key)
    return ctx
