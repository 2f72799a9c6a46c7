"""The HTTP server: listening, the application's lifecycle, and the drain.

Connections use edgeroute's own HTTP/1.1 protocol (`http_connection.py`); requests are
aiohttp's `web.Request`, answered by the aiohttp application (`server.create_app`) with its
routes, middleware and responses. The application's start-up and clean-up run through
aiohttp's `AppRunner`, as `web.run_app` would.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web

from edgeroute.config import Config
from edgeroute.errors import error_body
from edgeroute.http_connection import Connection
from edgeroute.metrics import METRICS, Metrics

log = logging.getLogger("edgeroute.http")


class ProxyServer:
    """Serves one application on one or more listening sockets until `cleanup()`."""

    def __init__(self, app: web.Application, config: Config, *, shutdown_timeout: float | None = None) -> None:
        srv = config.server
        self.app = app
        self.header_timeout = srv.header_timeout
        self.body_timeout = srv.body_timeout
        self.shutdown_timeout = srv.drain_timeout if shutdown_timeout is None else shutdown_timeout
        self.connections: set[Connection] = set()
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        self._listeners: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics: Metrics | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "setup() first"
        return self._loop

    async def setup(self) -> None:
        """Starts the application (its start-up and clean-up contexts)."""
        self._loop = asyncio.get_running_loop()
        await self._runner.setup()
        self._metrics = self.app.get(METRICS)

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
        try:
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

    def count_malformed(self) -> None:
        if self._metrics is not None:
            self._metrics.malformed_requests += 1

    async def cleanup(self) -> None:
        """The drain: stop accepting, close idle connections, let requests under way finish
        within `shutdown_timeout`, close what is left, then clean the application up."""
        for listener in self._listeners:
            listener.close()  # no new connections (not `wait_closed`: it waits for every open one)
        self._listeners.clear()
        deadline = (self._loop or asyncio.get_running_loop()).time() + self.shutdown_timeout
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
