"""Bare pass-through proxies: the floor under edgeroute's overhead.

``python -m edgeroute.bench.floor --upstream http://127.0.0.1:9000/v1 [--port 0]`` relays
`POST /v1/chat/completions` to the upstream with the same server and client stack as
edgeroute (uvloop, aiohttp server, one pooled `ClientSession`) and nothing else: no
routing decision, no middleware, no accounting. The overhead scenario can measure it
beside edgeroute (``--floor``) to separate what the stack costs from what edgeroute adds.

``--raw`` relays with the minimal HTTP/1.1 server and client of :mod:`edgeroute.bench.http1`
instead (non-streaming and streaming): what a Python proxy costs without aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    url = upstream.rstrip("/") + "/chat/completions"
    app = web.Application()

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024), skip_auto_headers=("User-Agent",)
        )
        yield
        await app[SESSION].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        hdrs = {"Content-Type": "application/json", "Authorization": "Bearer floor"}
        async with request.app[SESSION].post(url, data=body, headers=hdrs) as r:
            if r.content_type != "text/event-stream":
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
            out = web.StreamResponse(status=r.status)
            out.content_type = "text/event-stream"
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve_raw(upstream: str, port: int) -> None:
    from urllib.parse import urlsplit

    from edgeroute.bench.http1 import ClientPool, Conn, HttpServer, Request

    u = urlsplit(upstream.rstrip("/") + "/chat/completions")
    pool = ClientPool(u.hostname or "127.0.0.1", u.port or 80)
    hdrs = [("Content-Type", "application/json"), ("Authorization", "Bearer floor")]

    async def handle(req: Request, conn: Conn) -> None:
        started = False

        def on_head(status: int) -> None:
            nonlocal started
            started = True
            conn.start(status, "text/event-stream")

        await pool.request("POST", u.path, hdrs, req.body, on_head, conn.chunk)
        if started:
            conn.end()

    server = HttpServer(handle, "127.0.0.1", port)
    print(f"listening port={await server.start()}", flush=True)
    await asyncio.Event().wait()


async def serve(upstream: str, port: int) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    print(f"listening port={sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgeroute.bench.floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="edgeroute.bench.http1's server and client instead of aiohttp")
    a = p.parse_args(argv)
    import uvloop

    try:
        uvloop.run((serve_raw if a.raw else serve)(a.upstream, a.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
