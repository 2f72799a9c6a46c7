"""Errors as clients see them: OpenAI's JSON error format with the right status.

Every error the proxy raises on purpose is a :class:`ProxyError`; the server turns it
into a response with :func:`error_body`. Messages may quote an upstream's answer, which
may quote the credentials it was sent: :func:`error_body` passes every text through
`redact`, so no call site has to remember to.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from edgeroute import redact

# OpenAI's error `type` for each status we produce.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class StartError(Exception):
    """A server cannot start; the message says why and what to do, for the operator (no traceback)."""


class ProxyError(Exception):
    """An error answered to the client with `status` and an OpenAI-format body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
        details_key: str = "attempts",
    ) -> None:
        super().__init__(message)
        self.details_key = details_key
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.details = details

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> bytes:
        return error_body(
            self.status,
            self.message,
            code=self.code,
            param=self.param,
            details=self.details,
            details_key=self.details_key,
        )


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    details: list[dict[str, Any]] | None = None,
    details_key: str = "attempts",
) -> bytes:
    """The JSON body OpenAI sends for an error (`{"error": {...}}`)."""
    err: dict[str, Any] = {
        "message": redact.message(message),
        "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        "param": param,
        "code": code,
    }
    if details is not None:
        # E.g. which deployments were tried and why they failed: safe summaries only.
        err[details_key] = redact.value(details)
    return orjson.dumps({"error": err})


def too_many(message: str, code: str, wait_s: float) -> ProxyError:
    """A 429 for an admin action past its rate, with `Retry-After` (whole seconds, rounded up)."""
    return ProxyError(429, message, code=code, headers={"Retry-After": str(math.ceil(wait_s))})


def body_read_error(e: HttpProcessingError) -> ProxyError:
    """What a client is told when its body could not be read: it did not arrive within
    `server.body_timeout` (408), or its framing was malformed (400). Never quoted back."""
    if e.code == 408:
        return ProxyError(408, "The request body did not arrive in time.", code="body_timeout")
    return ProxyError(400, "The request body could not be parsed (bad framing).", code="malformed_request")


def checked_json(body: bytes | str) -> Any:
    """A request body parsed for a check that must read it (an owner check, a reservation).
    The core takes a body whose fields it does not read hold what orjson refuses (it skips them
    without decoding: a lone surrogate `"\\ud800"`, a number past a double `1e400`), and an
    upstream may read it: such a body is refused, never waved past the check (fail closed)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProxyError(400, f"The request body is not valid JSON: {e}.", code="invalid_request") from None
