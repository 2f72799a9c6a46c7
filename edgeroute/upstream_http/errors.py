"""What a call to an upstream raises when the transport fails.

Every failure is an :class:`UpstreamError`, an `OSError`; a connect timeout is also a
`TimeoutError`. `StaleConnection` never leaves the client: it is sent again once.
"""

from __future__ import annotations


class UpstreamError(OSError):
    """A transport failure talking to an upstream (the request may or may not have been seen)."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, DNS, TLS)."""


class UpstreamTlsError(UpstreamConnectError):
    """The TLS handshake failed; `reason` says why in words safe to show a client."""

    def __init__(self, msg: str, reason: str) -> None:
        super().__init__(msg)
        self.reason = reason


class UpstreamConnectTimeout(UpstreamError, TimeoutError):
    """No connection could be made within the connect timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream broke HTTP in a way it is to blame for (e.g. a head past MAX_HEAD_BYTES);
    the message is safe to show a client."""


class StaleConnection(UpstreamError):
    """A reused connection failed before any response byte: safe to send again once."""
