"""The admin CLI (`edgeroute keys|config|audit --url URL --key KEY`) sends its key to edgeroute
alone: a server that answers with a redirect (an SSO or ingress proxy in front of the gateway,
or a hostile one) got the key sent on to wherever `Location` pointed, and a POST there became a
GET whose JSON the command printed as done, exiting 0. A redirect is now an error naming it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from aiohttp import web
from aiohttp.test_utils import TestServer

KEY = "admin-secret-0123456789XYZ"


async def test_the_admin_cli_follows_no_redirect_and_sends_its_key_nowhere_else() -> None:
    seen: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"keys": [], "version": 1})

    other = TestServer(web.Application())
    other.app.router.add_route("*", "/{tail:.*}", elsewhere)
    await other.start_server()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{other.port}/stolen{request.path}")

    front = TestServer(web.Application())
    front.app.router.add_route("*", "/{tail:.*}", redirect)
    await front.start_server()
    try:
        for command in (["keys", "list"], ["keys", "create", "--name", "x"], ["config", "rollback", "1"]):
            out = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "edgeroute", *command, "--url", f"http://127.0.0.1:{front.port}", "--key", KEY],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode != 0, (command, out.stdout)
            assert "302" in out.stderr and "not followed" in out.stderr and "/stolen/admin/" in out.stderr, out.stderr
        assert seen == []  # the other host never heard from the CLI, nor got its key
    finally:
        await front.close()
        await other.close()
