"""The HTTP server's connection settings and its answers to requests that never parse.

Owns what happens before a request reaches the application:

- slowloris: aiohttp's server has no header-read timeout of its own, but its keep-alive
  timer closes a connection that is waiting for a request's headers once the timer runs
  out, and it is armed both when a connection opens and after each answer. Setting it to
  `server.header_timeout` bounds the time to deliver a request's headers (and the idle
  time between requests) on every connection. A body that has not arrived whole within
  `server.body_timeout` of its headers fails the handler's read with :class:`BodyTimeout`
  (answered 408), whichever handler reads it.
- parser-level rejections (malformed request line or headers, a header over the size
  limit, a bad chunked encoding): aiohttp answers them in plain text that quotes the
  offending line (the client's token with it) and logs a traceback for each. Here they
  are answered in OpenAI's JSON error format without quoting anything, logged at debug
  level as one line, and counted (`Metrics.malformed_requests`).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from edgeroute.config import Config
from edgeroute.errors import error_body
from edgeroute.metrics import METRICS, Metrics

log = logging.getLogger("edgeroute.http")

# aiohttp's parser limit for one request or header line (its default, kept explicit).
MAX_LINE_BYTES = 8190


def malformed_answer(exc: BaseException) -> web.Response:
    """The JSON answer to a request the HTTP parser refused; says what kind, never quotes it."""
    if isinstance(exc, LineTooLong):
        status, msg = 431, f"A request line or header is too long (limit {MAX_LINE_BYTES} bytes)."
    else:
        status, msg = 400, "The request could not be parsed as HTTP/1.1 (malformed request line, headers or body)."
    resp = web.Response(status=status, body=error_body(status, msg, code="malformed_request"))
    resp.content_type = "application/json"
    resp.force_close()  # the stream is out of step: nothing more can be read from it safely
    return resp


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with parser errors answered in JSON and not logged as tracebacks."""

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) <= queued:
            return
        # New requests: give each body that has not arrived whole `server.body_timeout`
        # (a small body usually comes with its headers: no timer then).
        for i in range(queued, len(self._messages)):
            payload = self._messages[i][1]
            if not payload.is_eof():
                timer = self._loop.call_later(self._body_timeout(), _expire_body, payload)
                payload.on_eof(timer.cancel)  # arrived (or failed): drop the timer and its reference
        request = self._current_request
        if request is None:
            return
        exc = getattr(self._messages[-1][0], "exc", None)
        if isinstance(exc, HttpProcessingError):
            # The body of the request being handled is malformed (e.g. a bad chunk): aiohttp
            # would queue the error as a second "request" and leave the handler waiting for
            # the body. Fail the body read instead (one answer, a 400) and close after it.
            self._messages.pop()
            self._count_malformed()
            request.content.set_exception(exc)
            request.content.feed_eof()  # nothing more to read: no lingering read after the answer
            self.close()

    def _body_timeout(self) -> float:
        return getattr(self._manager, "body_timeout", None) or 30.0

    def _count_malformed(self) -> None:
        metrics = getattr(self._manager, "metrics", None)
        if isinstance(metrics, Metrics):
            metrics.malformed_requests += 1

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            resp = super().handle_error(request, status, exc, message)  # logged (redacted) as before
            if isinstance(resp, web.Response) and resp.content_type == "text/plain":
                return _json_500(status)
            return resp
        self._count_malformed()
        log.debug("malformed request from %s refused (%s)", request.remote, type(exc).__name__)
        return malformed_answer(exc)


class BodyTimeout(HttpProcessingError):
    """A request body that did not arrive within `server.body_timeout` (answered 408)."""

    code = 408
    message = "request body timeout"


def _expire_body(payload: StreamReader) -> None:
    if not payload.is_eof():
        payload.set_exception(BodyTimeout())  # the handler's read raises; the answer is a 408
        payload.feed_eof()  # and nothing more is read from this request


def _json_500(status: int) -> web.Response:
    resp = web.Response(status=status, body=error_body(status, "Internal error in edgeroute."))
    resp.content_type = "application/json"
    resp.force_close()
    return resp


class _ProxyServer(web.Server):
    """Makes edgeroute's connection protocol instead of aiohttp's default one."""

    metrics: Metrics | None = None
    body_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _ProxyRequestHandler(self, loop=self._loop, **kwargs)


class ProxyRunner(web.AppRunner):
    """An `AppRunner` whose connections use edgeroute's protocol and settings."""

    def __init__(self, app: web.Application, config: Config, **kwargs: Any) -> None:
        server = config.server
        super().__init__(
            app,
            access_log=None,
            handler_cancellation=True,  # a client that goes away cancels its handler (and its upstream call)
            keepalive_timeout=server.header_timeout,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            **kwargs,
        )
        self._body_timeout = server.body_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server in `Application._make_handler`; only the protocol it makes changes.
        server.__class__ = _ProxyServer
        assert isinstance(server, _ProxyServer)
        server.metrics = self.app.get(METRICS)
        server.body_timeout = self._body_timeout
        return server
