"""Helpers for the cost tests (no tests here): services, a proxy built from config alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from edgeroute import config as config_mod
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer
from tests.serve_support import free_port

REDIS_URL = os.environ.get("EDGEROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# For tests whose subject is not a timeout: the product's 200 ms covers a first connect (AUTH,
# SELECT) on a quiet host, and a loaded 2-core CI host once took longer (a NotSent flake).
LOADED_HOST_MS = 5_000
PG_DSN = os.environ.get("EDGEROUTE_TEST_PG_DSN", "postgresql://edgeroute:ci-pg-only-5d1e@127.0.0.1:5432/edgeroute_test")


def require(name: str, check: Callable[[], object]) -> None:
    """Skips (fails when CI=true) unless `check()` succeeds."""
    try:
        check()
    except Exception as e:
        msg = f"{name} is not reachable ({type(e).__name__}: {e}); run .ci/start-services"
        msg = re.sub(r"://([^:/@]+):[^@/]+@", r"://\1:***@", msg)  # no password in test output
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def require_redis() -> str:
    import redis

    require(f"redis at {REDIS_URL}", lambda: redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    return REDIS_URL


def require_postgres() -> str:
    def check() -> None:
        import psycopg

        psycopg.connect(PG_DSN, connect_timeout=2).close()

    require(f"postgresql at {PG_DSN}", check)
    return PG_DSN


class RedisServer:
    """A private redis-server on a free loopback port, which a test may stop and restart."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        require("redis-server binary", lambda: binary or (_ for _ in ()).throw(FileNotFoundError("redis-server")))
        self.binary = binary or "redis-server"
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Starts it on `port` (kept across restarts), ready once it answers PING: a port taken
        meanwhile by another process fails here, not later as a client's unreachable Redis."""
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG") and self.proc.poll() is None:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # only the process this helper started
            self.proc.wait(5)
            self.proc = None


@dataclass
class CostProxy:
    server: ProxyTestServer
    app: web.Application

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def cost_proxy(cfg_data: dict[str, Any]) -> AsyncIterator[CostProxy]:
    """The real app built from config only (ledger, admission from the config); closed (flushed) on exit."""
    cfg = config_mod.parse(cfg_data, "test.yaml")
    app = create_app(cfg, "test.yaml")
    server = ProxyTestServer(app)
    await server.start_server()
    try:
        yield CostProxy(server, app)
    finally:
        await server.close()


def one_deployment(base_url: str, **extra: Any) -> dict[str, Any]:
    """Providers a (and b if `second`), model `m`; output-only prices so that costs are exact."""
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": base_url, "api_key": "key-a"}},
        "deployments": {
            "d-a": {"provider": "a", "model": "gpt-4o-mini", "price": {"input_per_mtok": 0, "output_per_mtok": 2.0}}
        },
        "models": {"m": {"deployments": ["d-a"]}},
    }
    cfg.update(extra)
    return cfg


def downgrade_at_half(limit_usd: float, to: str) -> dict[str, Any]:
    """`budgets:` with one global monthly budget that downgrades to model `to` at 50 %."""
    action = {"at_percent": 50, "action": "downgrade", "to": to}
    return {"limits": [{"name": "month", "scope": "global", "limit_usd": limit_usd, "actions": [action]}]}


async def ask_status(client: openai.AsyncOpenAI, max_tokens: int = 5) -> int:
    """One small chat request through `client`: the HTTP status a user would see."""
    try:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
        )
        return 200
    except openai.APIStatusError as e:
        return e.status_code


async def answered(url: str, n: int, token: str = "unused", refused_for: str | None = None) -> int:
    """How many of `n` sequential chat requests (max_tokens 5) are answered; the others are
    refused (429, whose message names `refused_for` when given), or meet a store that is
    coming back (503: a pause, then the next)."""
    done = 0
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as client:
        for _ in range(n):
            try:
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
                )
                done += 1
            except openai.RateLimitError as e:
                assert refused_for is None or refused_for in str(e).lower(), e
            except openai.InternalServerError:
                await asyncio.sleep(0.1)
    return done


async def budget_spent(url: str, admin: str, name: str = "b") -> float:
    """Budget `name`'s spend as `GET /admin/budgets` reports it to key `admin`."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/admin/budgets", headers={"Authorization": f"Bearer {admin}"}) as r:
            spent: float = next(b for b in (await r.json())["budgets"] if b["name"] == name)["spent_usd"]
    return spent


async def statuses_of(ask: Callable[[], Awaitable[object]], n: int = 10) -> list[int]:
    """The statuses of `n` concurrent calls of `ask` (an SDK's request), sorted: 200, or the
    status of the API error it raised."""

    async def one() -> int:
        try:
            await ask()
        except (openai.APIStatusError, anthropic.APIStatusError) as e:
            return e.status_code
        return 200

    return sorted(await asyncio.gather(*(one() for _ in range(n))))
