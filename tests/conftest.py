"""Shared fixtures: real mock upstreams and a real proxy on loopback ports.

Nothing here mocks edgeroute's own code: the proxy is the real aiohttp app with the
real Rust core, and upstreams are real HTTP servers speaking each provider's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from edgeroute import config as config_mod
from edgeroute.accounting import MemoryRecorder
from edgeroute.http_server import ProxyServer
from edgeroute.mock.openai import MockOptions, build_app
from edgeroute.server import create_app

# Under pytest-xdist (`tests/run` runs two workers) each worker has a Redis database of its own,
# counting down from the one named (15 by default; 15, 14, ...): tests flush theirs. Set before
# `tests.test_cost_support` reads it.
if (_worker := os.environ.get("PYTEST_XDIST_WORKER", "")).startswith("gw"):
    _server, _, _db = os.environ.get("EDGEROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15").rpartition("/")
    _n = int(_db) if _db.isdigit() else 0
    _n = _n - int(_worker[2:]) if _n >= int(_worker[2:]) else _n + int(_worker[2:])
    os.environ["EDGEROUTE_TEST_REDIS_URL"] = f"{_server}/{_n}"

# Performance figures: `perf` marker and fixture, reported at the end of the run (tests/perf.py).
pytest_plugins = ["tests.perf"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Prices come from the bundled catalogue in tests, never from a catalogue a user updated.
os.environ["EDGEROUTE_PRICES"] = str(Path(tempfile.mkdtemp(prefix="edgeroute-tests-")) / "prices.json")


# -- the allocator -----------------------------------------------------------------------------
# The router training tests (tests/test_learn_*) update weight arrays of 2^18 rows many times a
# second. With glibc's defaults each such array of megabytes was handed back to the kernel when
# freed and faulted in again, page by page, when the next was made: 3.7 million page faults
# and up to twice the wall time for two of those tests. This process (not the servers the tests
# start, which set their own) keeps up to 128 MiB freed and serves blocks up to 32 MiB from it.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent from C libraries other than glibc
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(M_TRIM_THRESHOLD, 128 << 20)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


_keep_freed_memory()


# -- the collector ------------------------------------------------------------------------------
# What collection imported (the SDKs, aiohttp, edgeroute, every test module: some 300,000
# objects) lives as long as the run: frozen, as `edgeroute serve` freezes its own, each full
# collection no longer walks it again. Those collections took a tenth of this process's CPU time
# (tests/security: 24 s of 194), up to 0.3 s at a time in whichever test they fell on.


def pytest_collection_finish(session: pytest.Session) -> None:
    # Hypothesis, imported later, finds the objects that refer to a PRNG it is handed with
    # gc.get_referrers, which does not see frozen ones: it warned (an error here) that trio's
    # was unreferenced. Imported now, its registrations are made before the freeze.
    import hypothesis  # noqa: F401

    gc.collect()
    gc.freeze()


# -- waiting for background work ---------------------------------------------------------------
# A test that needs something done off the request path (a batch flushed, a process started, a
# guard's rollback finished) polls for it: the deadline is generous, for a CI machine busy with
# other work, and ends as soon as the condition holds. EDGEROUTE_TEST_PATIENCE multiplies every
# deadline (a slower machine); no test sleeps a fixed time for background work instead.
PATIENCE = float(os.environ.get("EDGEROUTE_TEST_PATIENCE", "1"))
T = TypeVar("T")


def patience(seconds: float) -> float:
    """`seconds` as a deadline for background work on this machine."""
    return seconds * PATIENCE


async def eventually(probe: Callable[[], Awaitable[T]], what: str, within: float = 30.0, every: float = 0.05) -> T:
    """The first truthy value `probe()` returns; fails, naming `what` and the last value seen,
    when none came within `within` seconds (times PATIENCE)."""
    deadline = time.monotonic() + patience(within)
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {patience(within):.0f} s (last seen: {got!r})")
        await asyncio.sleep(every)


async def wait_ready(url: str, within: float = 60.0, proc: Any = None) -> None:
    """Until `url/readyz` answers 200. A process that started it (`proc`: asyncio or Popen)
    and exited ends the wait at once."""

    async def ready() -> bool:
        code = None if proc is None else proc.poll() if hasattr(proc, "poll") else proc.returncode
        if code is not None:
            raise AssertionError(f"the server exited with {code} before it was ready")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url + "/readyz") as r:
                return r.status == 200
        return False

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await eventually(ready, f"{url} ready", within)


@pytest.fixture(autouse=True)
async def _sdk_clients_closed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Keep every async SDK client a test makes alive until teardown, then close it.

    A client dropped mid-test is garbage-collected: its socket is closed at once, but the
    transport's cleanup runs later and unregisters that fd number from the event loop, by then
    perhaps a new listening socket of the next proxy, which then never accepts (a hung test).
    """
    made: list[Any] = []
    for cls in (openai.AsyncOpenAI, anthropic.AsyncAnthropic):
        init = cls.__init__

        def tracked(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
            _init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", tracked)
    yield
    for client in made:
        await client.close()


class Upstream:
    def __init__(self, server: TestServer, options: MockOptions) -> None:
        self.server = server
        self.options = options

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"


class Proxy:
    def __init__(self, server: ProxyTestServer, app: web.Application, recorder: MemoryRecorder) -> None:
        self.server = server
        self.app = app
        self.recorder = recorder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


class ProxyTestServer:
    """The proxy app served by edgeroute's own HTTP server, as `edgeroute serve` serves it,
    with the part of aiohttp's `TestServer` interface the tests use."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1") -> None:
        from edgeroute.state import STATE

        self.app = app
        self.host = host
        self.server = ProxyServer(app, app[STATE].live.config)
        self.port = 0

    async def start_server(self) -> None:
        await self.server.setup()
        await self.server.listen(self.host, 0)
        self.port = self.server.port

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.host}:{self.port}{path}")

    async def close(self) -> None:
        await self.server.cleanup()


async def _serve(app: web.Application) -> TestServer:
    # As in `edgeroute serve`: a client that goes away cancels its handler (and so the upstream call).
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    return server


@pytest.fixture
async def start_upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    servers: list[TestServer] = []

    async def start(**kwargs: Any) -> Upstream:
        opts = MockOptions(**kwargs)
        server = await _serve(build_app(opts))
        servers.append(server)
        return Upstream(server, opts)

    yield start
    for s in servers:
        await s.close()


# -- mock upstreams made of a test's own handlers ---------------------------------------------
# A test whose upstream must answer as no bundled mock does (a careless provider, a webhook
# receiver) writes the handlers and serves them with `routes_upstream`: aiohttp's route
# definitions in, a started loopback server out, e.g.
#
#     async with routes_upstream(web.post("/v1/chat/completions", handle)) as up:
#         cfg["providers"]["p"]["base_url"] = up.url + "/v1"
#
# `serve_routes` (a fixture) starts several, each closed at teardown; `start_routes` leaves
# closing to the caller (a helper that hands the server on).


class RoutesServer(TestServer):
    """A mock upstream on loopback made of a test's routes; `url` is its root (no trailing slash)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_routes(*routes: web.AbstractRouteDef, **app_options: Any) -> RoutesServer:
    """A server for `routes` (`web.post(path, handler)`, ...), started; the caller closes it.
    `app_options` go to `web.Application` (e.g. `client_max_size`)."""
    app = web.Application(**app_options)
    app.add_routes(routes)
    server = RoutesServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@contextlib.asynccontextmanager
async def routes_upstream(*routes: web.AbstractRouteDef, **app_options: Any) -> AsyncIterator[RoutesServer]:
    """`start_routes` for the length of a `with` block."""
    server = await start_routes(*routes, **app_options)
    try:
        yield server
    finally:
        await server.close()


ServeRoutes = Callable[..., Awaitable[RoutesServer]]


@pytest.fixture
async def serve_routes() -> AsyncIterator[ServeRoutes]:
    """`start_routes` for a test or fixture that starts several: all closed at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*routes: web.AbstractRouteDef, **app_options: Any) -> RoutesServer:
            return await stack.enter_async_context(routes_upstream(*routes, **app_options))

        yield start


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: a worker's Unix sockets are made in the run directory,
    and pytest's `tmp_path` (`/tmp/pytest-of-root/pytest-1003/popen-gw1/test_the_run_directory_is_made0/`)
    took their paths past the 107 bytes a socket's may have."""
    d = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


_PG_SCHEMAS: list[str] = []


def _pg_schema() -> tuple[str, str]:
    """A new schema in the test database: (its name, the DSN with it as `search_path`). A ledger
    there is its test's alone: in `public`, two test runs at once (a CI run beside a developer's)
    found each other's server holding the ledger's lock (it is per schema) and refused to start,
    "another edgeroute serve is using the ledger"."""
    import uuid

    import psycopg

    from tests.test_cost_support import require_postgres

    dsn = require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    return schema, f"{dsn}{'&' if '?' in dsn else '?'}options=-csearch_path%3D{schema}"


def _drop_pg_schema(schema: str) -> None:
    import psycopg

    from tests.test_cost_support import require_postgres

    with psycopg.connect(require_postgres(), autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def new_pg_schema_dsn() -> str:
    """`pg_schema_dsn` for helpers that are not fixtures: the schema is dropped when the test
    session ends."""
    schema, dsn = _pg_schema()
    _PG_SCHEMAS.append(schema)
    return dsn


@pytest.fixture(scope="session", autouse=True)
def _drop_session_pg_schemas() -> Iterator[None]:
    yield
    for schema in _PG_SCHEMAS:
        _drop_pg_schema(schema)


@pytest.fixture
def pg_schema_dsn() -> Iterator[str]:
    """The test database's DSN with a schema of this test's own (created here, dropped after)
    as its `search_path`."""
    schema, dsn = _pg_schema()
    try:
        yield dsn
    finally:
        _drop_pg_schema(schema)


def simple_config(upstreams: dict[str, Upstream], **extra: Any) -> dict[str, Any]:
    """One provider and one deployment per upstream; model `m` over all of them."""
    cfg: dict[str, Any] = {
        "providers": {name: {"base_url": u.base_url, "api_key": f"key-{name}"} for name, u in upstreams.items()},
        "deployments": {
            f"d-{name}": {
                "provider": name,
                "model": "gpt-4o-mini",
                "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
            }
            for name in upstreams
        },
        "models": {"m": {"deployments": [f"d-{name}" for name in upstreams]}},
    }
    cfg.update(extra)
    return cfg


def shadow_config(
    base_url: str, price: dict[str, float], shadow_price: dict[str, float] | None = None, **extra: Any
) -> dict[str, Any]:
    """Model `m` (deployment `cheap`, gpt-4o-mini, at `price`) with every request mirrored to
    model `s` (deployment `strong`, gpt-4o, at `shadow_price`, else `price`), both on the
    upstream at `base_url`."""
    cfg: dict[str, Any] = {
        "providers": {"a": {"base_url": base_url, "api_key": "key-a"}},
        "deployments": {
            "cheap": {"provider": "a", "model": "gpt-4o-mini", "price": price},
            "strong": {"provider": "a", "model": "gpt-4o", "price": shadow_price or price},
        },
        "models": {
            "m": {"deployments": ["cheap"], "shadow": {"model": "s", "percent": 100}},
            "s": {"deployments": ["strong"]},
        },
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
async def start_proxy() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    servers: list[ProxyTestServer] = []

    async def start(cfg_data: dict[str, Any]) -> Proxy:
        cfg = config_mod.parse(cfg_data, "test.yaml")
        recorder = MemoryRecorder()
        app = create_app(cfg, "test.yaml", recorder)
        server = ProxyTestServer(app)
        await server.start_server()
        servers.append(server)
        return Proxy(server, app, recorder)

    yield start
    for s in servers:
        await s.close()


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback: its URL, and the JSON bodies it was sent, in order."""
    got: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=204)

    async with routes_upstream(web.post("/hook", handle)) as server:
        yield server.url + "/hook", got
