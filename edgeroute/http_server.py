"""The HTTP server: listening, the application's lifecycle, and the drain.

Connections use edgeroute's own HTTP/1.1 protocol (`http_connection.py`); requests are
aiohttp's `web.Request`, answered by the aiohttp application (`server.create_app`) with its
routes, middleware and responses. The application's start-up and clean-up run through
aiohttp's `AppRunner`, as `web.run_app` would.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial, update_wrapper
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractMatchInfo
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from edgeroute import anthropic_api
from edgeroute.config import Config
from edgeroute.errors import error_body
from edgeroute.http_connection import Connection, ContinueReader
from edgeroute.metrics import METRICS, Metrics

log = logging.getLogger("edgeroute.http")

if TYPE_CHECKING:
    import resource
else:
    try:
        import resource
    except ImportError:  # not on Windows: no limit to read or raise
        resource = None

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_RESERVE_FDS = 4096  # kept for upstream connections, databases, files: the cap leaves them
_SHED_SHARE = 8  # at the cap, the longest-idle eighth of the idle connections are closed


def raise_open_file_limit() -> int:
    """Raises the soft limit on open files to the hard one (as Go's runtime does for every
    program): the soft default, often 1,024, is a handful of idle clients from refusing
    everyone. Returns the soft limit now in force (0: unknown)."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not lowered; the soft one goes to the kernel's usual cap then.
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("could not raise the open-file limit from %d: %s", soft, e)
    return int(min(soft, 1 << 20))


def connection_cap(configured: int | None, open_files: int) -> int:
    """Client connections one process holds at once: the configured number, else what the
    open-file limit leaves after a reserve for everything else (half of it at least). Past
    the limit the kernel refuses every new connection, a request's upstream call and the
    ledger's files alike: the cap keeps those working while idle clients are shed."""
    if configured is not None:
        return configured
    if open_files <= 0:
        return 1 << 20
    return max(open_files // 2, open_files - _RESERVE_FDS)


class ProxyServer:
    """Serves one application on one or more listening sockets until `cleanup()`."""

    def __init__(self, app: web.Application, config: Config, *, shutdown_timeout: float | None = None) -> None:
        srv = config.server
        self.app = app
        self.header_timeout = srv.header_timeout
        self.body_timeout = srv.body_timeout
        self.send_timeout = srv.send_timeout
        self.shutdown_timeout = srv.drain_timeout if shutdown_timeout is None else shutdown_timeout
        self.connections: set[Connection] = set()
        self.idle_starts = itertools.count()  # orders idle connections, longest idle first
        self.max_connections = connection_cap(srv.max_client_connections, raise_open_file_limit())
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self._listeners: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics: Metrics | None = None
        # Each route handler within the application's middleware (see `_handle`).
        self._chains: dict[Callable[..., Any], Handler] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "setup() first"
        return self._loop

    async def setup(self) -> None:
        """Starts the application (its start-up and clean-up contexts)."""
        self._loop = asyncio.get_running_loop()
        await self._runner.setup()
        self._metrics = self.app.get(METRICS)
        if self._metrics is not None:
            self._metrics.client_connections = self.connections

    async def listen(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 2048) -> None:
        """Accepts connections on `host:port` (port 0: any free one, see `port`)."""
        server = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=backlog, reuse_address=True, reuse_port=reuse_port
        )
        self._listeners.append(server)

    @property
    def port(self) -> int:
        sock: socket.socket = self._listeners[0].sockets[0]
        return int(sock.getsockname()[1])

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The application's answer to a request; never raises but for a client gone away."""
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            # aiohttp answers it before the application, in plain text quoting the header.
            return _expectation_failed(request.path)
        try:
            # `100 Continue` is sent when the handler first waits for the body (`ContinueReader`).
            match_info = await self.app.router.resolve(request)
            handler = self._chain(request, match_info)
            if handler is None and expect is not None:
                # A 404 or 405: aiohttp's `_handle` sends `100 Continue` before the middleware, so
                # a client without a key was asked for a body only to be refused; not asked here.
                handler = self._error_chain(request, match_info)
            if handler is not None:
                return await handler(request)
            if expect is not None and isinstance(request.content, ContinueReader):
                request.content.continued = True  # aiohttp's `_handle` answers it itself
            return await self.app._handle(request)
        except web.HTTPException as e:  # a response in aiohttp 3 (the middleware turns most into JSON)
            return e
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            resp = web.Response(status=500, body=error_body(500, "Internal error in edgeroute."))
            resp.content_type = "application/json"
            resp.force_close()
            return resp

    def _chain(self, request: web.Request, match_info: AbstractMatchInfo) -> Handler | None:
        """What aiohttp's `Application._handle` does with a request to a route of the application
        (no `Expect`, new-style middleware only, no sub-application) once it is resolved: the
        route's handler within the application's middleware, kept per handler. Without what
        `_handle` does for every request besides: `asyncio.get_event_loop()` (a getpid() system
        call on Python 3.11) to ask whether the loop debugs, an ABC `isinstance` for a system
        route, and a middleware around every chain to make a sub-application the request's
        `app` (with none, the application is already: a coroutine fewer at each step of the
        request). None for anything else (a 404 or 405): aiohttp's own resolves it again."""
        if type(match_info) is not UrlMappingMatchInfo or not self._bind(request, match_info):
            return None
        route_handler = match_info.handler
        handler = self._chains.get(route_handler)
        if handler is None:
            handler = self._chains[route_handler] = self._within_middleware(route_handler)
        return handler

    def _error_chain(self, request: web.Request, match_info: AbstractMatchInfo) -> Handler | None:
        """The middleware around a 404's or 405's handler (aiohttp's `MatchInfoError`), as
        aiohttp's `_handle` chains it but without its `Expect` handling; not kept (aiohttp makes
        a new handler for each). None where `_chain` would not chain."""
        if not isinstance(match_info, UrlMappingMatchInfo) or not self._bind(request, match_info):
            return None
        return self._within_middleware(match_info.handler)

    def _bind(self, request: web.Request, match_info: UrlMappingMatchInfo) -> bool:
        """Makes `match_info` the request's, as `_handle` does; False (nothing done) where the
        application has old-style middleware or a sub-application, which `_handle` serves."""
        app = self.app
        # aiohttp's private state, read with defaults: an aiohttp without it gets its own `_handle`.
        if getattr(app, "_has_legacy_middlewares", True) or getattr(app, "_subapps", True):
            return False
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info
        return True

    def _within_middleware(self, handler: Handler) -> Handler:
        for m in reversed(self.app.middlewares):  # as aiohttp chains them: the first outermost
            handler = update_wrapper(partial(m, handler=handler), handler)
        return handler

    def admit(self, conn: Connection) -> bool:
        """Whether a new connection is kept. At the cap, the longest-idle connections (no
        request under way: a client keeping a connection for later, or one trickling a head)
        are closed first, an eighth of them at a time so a flood costs a sort now and then,
        not one per connection. With none idle, those whose request still waits for its body
        (a body trickled, or never sent after `100 Continue`) are, longest waiting first:
        else a few such clients held everyone else out for `body_timeout`, again and again.
        If every connection is answering a request it has whole, the new one is refused."""
        if len(self.connections) < self.max_connections:
            self.connections.add(conn)
            return True
        shed = _sheddable(self.connections)
        for c in shed:
            c.shed()
        self._count_shed(len(shed) + (0 if shed else 1))
        if not shed:
            log.warning("refused a client connection: %d open, all answering", len(self.connections))
            return False
        self.connections.add(conn)
        return True

    def _count_shed(self, n: int) -> None:
        if self._metrics is not None:
            self._metrics.connections_shed += n

    def count_malformed(self) -> None:
        if self._metrics is not None:
            self._metrics.malformed_requests += 1

    async def cleanup(self) -> None:
        """The drain: stop accepting, close idle connections, let requests under way finish
        within `shutdown_timeout`, close what is left, then clean the application up."""
        for listener in self._listeners:
            listener.close()  # no new connections (not `wait_closed`: it waits for every open one)
        self._listeners.clear()
        # The drain ends streams still running at `shutdown_timeout` with an error event, and
        # timers of other attempts fire then too: their answers are being written as this
        # deadline comes. On a stalled loop both fell due in one turn, and closing first cut a
        # stream's error event off (the client read a truncated body). Connections still busy
        # then get `CUT_GRACE_S` to finish before they are closed.
        deadline = (self._loop or asyncio.get_running_loop()).time() + self.shutdown_timeout + CUT_GRACE_S
        while True:
            busy = [c for c in list(self.connections) if not c.close_idle()]
            if not busy or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()  # what is still running is cancelled (connection_lost)
        await asyncio.sleep(0)
        await self._runner.cleanup()


# How long past the drain timeout connections still answering are waited for (see `cleanup`).
CUT_GRACE_S = 0.5


def _body_since(c: Connection) -> int:
    return c.body_since or 0


def _idle_order(c: Connection) -> tuple[bool, int]:
    # Closing ones (-1) first; then idle ones, one whose answer's tail is still unsent last:
    # shedding it drops that tail.
    since = c.idle_since or 0
    return since >= 0 and c.unsent > 0, since


def _sheddable(connections: set[Connection]) -> list[Connection]:
    """The connections closed at the cap (see `ProxyServer.admit`): idle ones, else those
    whose request body has stopped coming; the longest waiting eighth."""
    waiting = sorted((c for c in connections if c.idle_since is not None), key=_idle_order)
    if not waiting:
        waiting = sorted((c for c in connections if c.body_since is not None), key=_body_since)
    return waiting[: max(1, len(waiting) // _SHED_SHARE)]


def _expectation_failed(path: str) -> web.StreamResponse:
    """417 in the API's format for an `Expect` other than `100-continue`; the body is left unread."""
    msg = "The Expect header is not supported; only 100-continue is."
    resp = web.Response(status=417, body=error_body(417, msg, code="expectation_failed"))
    resp.content_type = "application/json"
    resp.headers["Server"] = "edgeroute"  # answered before the application, whose signal sets it
    resp.force_close()
    return anthropic_api.rewrite_error(resp) if anthropic_api.anthropic_path(path) else resp
