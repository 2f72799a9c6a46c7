"""A server counting budgets alone stops spending once a partition has taken its ledger's lock.

Without `shared_state` the PostgreSQL ledger's advisory lock keeps a second server off the
budgets. A partition between a server and PostgreSQL ends the lock's session: while it lasted
the server went on admitting requests against its own counters, and a second server started
meanwhile took the lock and spent the budget again ($1.52 spent of $1.00). Here the server
reaches PostgreSQL through a forwarder the test cuts: after a short grace every request is a
503 `ledger_unavailable` and `/readyz` is 503, and once the forwarder is back the server takes
its lock again and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import openai

from tests.conftest import eventually
from tests.scale.support import Spawn, kill_tree
from tests.scale.test_ledger_ownership import config_with_a_budget
from tests.serve_support import free_port
from tests.test_cost_support import answered


class Forwarder:
    """A TCP forwarder to PostgreSQL that the test can cut (every connection closed) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.upstreams: list[asyncio.StreamWriter] = []
        self.upstreams_kept = False  # after `cut_one_side`: PostgreSQL's side is not closed
        # Cleared: bytes are held, every connection left open (a partition that drops packets,
        # as neither end sees a thing); set again, they pass.
        self.passing = asyncio.Event()
        self.passing.set()

    async def cut_one_side(self) -> None:
        """A partition that drops packets, as each side ends up seeing it: the server's side of
        every connection fails (its keepalives went unanswered), PostgreSQL's stays open and
        silent (it sends nothing on an idle session, so it notices nothing for hours)."""
        assert self.server is not None
        self.upstreams_kept = True
        self.server.close()
        for w in self.writers:
            if w not in self.upstreams:
                w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers + self.upstreams:
            w.transport.abort()
        self.writers.clear()
        self.upstreams.clear()
        await self.server.wait_closed()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            w.transport.abort()
            return
        self.writers += [w, uw]
        self.upstreams.append(uw)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    await self.passing.wait()
                    dst.write(data)
                    await dst.drain()
            if dst not in self.upstreams or not self.upstreams_kept:
                dst.transport.abort()

        await asyncio.gather(copy(r, uw), copy(ur, w))


def _through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    auth = parts.netloc.rsplit("@", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}"))


async def _refusal(url: str) -> openai.APIStatusError | None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        try:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        except openai.APIStatusError as e:
            return e
    return None


async def _forwarder(dsn: str) -> Forwarder:
    """A started forwarder to the PostgreSQL of `dsn` (reach it with `_through(dsn, fwd.port)`)."""
    pg = urlsplit(dsn)
    fwd = Forwarder((pg.hostname or "127.0.0.1", pg.port or 5432))
    await fwd.start()
    return fwd


async def _answering(url: str) -> bool:
    return await _refusal(url) is None


async def _lock_lost(url: str) -> bool:
    """`/readyz` says not ready for the ledger's lock (asked without spending: a request
    answered during the grace would spend)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status == 503 and "ledger_lock" in await r.json()


async def test_a_partitioned_server_counting_alone_refuses_until_it_holds_the_lock_again(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any
) -> None:
    fwd = await _forwarder(pg_schema_dsn)
    up = await start_upstream()
    cfg = config_with_a_budget(
        up.base_url, ledger={"backend": "postgres", "dsn": _through(pg_schema_dsn, fwd.port), "flush_interval": 0.1}
    )
    # Counted alone (no shared_state: the lock is exclusive), never reached; on_unavailable is `open`.
    cfg["budgets"] = {"limits": [{"name": "far", "scope": "global", "limit_usd": 1000.0, "period": "day"}]}
    inst = await spawn(cfg, name="pg")
    try:
        assert await answered(inst.url, 2) == 2
        await fwd.cut()  # the partition: the lock's session and the ledger's connections end

        async def refused() -> openai.APIStatusError | None:
            return await _refusal(inst.url)

        e = await eventually(refused, "a request refused while the lock cannot be held", within=20, every=0.2)
        assert e is not None
        assert e.status_code == 503 and e.code == "ledger_unavailable", e
        assert "no longer holds the ledger's lock" in e.message
        async with aiohttp.ClientSession() as s, s.get(inst.url + "/readyz") as r:
            assert r.status == 503
            assert (await r.json())["ledger_lock"]["held"] is False
        assert "refuses requests (503)" in inst.output()

        await fwd.start()  # the partition heals: the lock is taken again, and requests with it

        await eventually(lambda: _answering(inst.url), "requests answered again", within=20, every=0.2)
        assert "taking requests again" in inst.output()
    finally:
        with contextlib.suppress(Exception):
            await fwd.cut()


async def test_after_the_partition_the_server_counts_what_another_spent_meanwhile(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any
) -> None:
    """The reported case: a second server took the ledger during the partition and spent the
    budget's rest. The first, once it holds the lock again, counts that spend before it takes
    requests: it resumed on its own counters, and the two spent $0.15 of $0.10."""
    fwd = await _forwarder(pg_schema_dsn)
    up = await start_upstream()
    ledger = {"backend": "postgres", "flush_interval": 0.1}
    # $0.01 a request, $0.10 a day, counted alone by each server.
    first = await spawn(config_with_a_budget(up.base_url, ledger={**ledger, "dsn": _through(pg_schema_dsn, fwd.port)}))
    try:
        assert await answered(first.url, 3) == 3
        await asyncio.sleep(0.5)  # written
        await fwd.cut()
        await eventually(lambda: _lock_lost(first.url), "the first server not ready", within=20, every=0.2)
        second = await spawn(config_with_a_budget(up.base_url, ledger={**ledger, "dsn": pg_schema_dsn}), name="two")
        assert await answered(second.url, 10, refused_for="budget") == 7  # the budget's rest
        await asyncio.sleep(0.5)  # written
        kill_tree(second.proc.pid)  # its session, and the lock with it, end
        await second.proc.wait()

        await fwd.start()

        async def taking() -> bool:  # answered, or refused for its budget: not for the ledger
            e = await _refusal(first.url)
            return e is None or e.status_code == 429

        await eventually(taking, "the first server holding the lock again", within=20, every=0.2)
        assert await answered(first.url, 5, refused_for="budget") == 0  # the second spent the rest
        assert "spend read back" in first.output()
    finally:
        with contextlib.suppress(Exception):
            await fwd.cut()


async def test_after_a_silent_partition_the_server_ends_its_own_orphaned_lock_session(
    pg_schema_dsn: str, spawn: Spawn, start_upstream: Any
) -> None:
    """A partition that drops packets leaves PostgreSQL's side of the lock's session open, and
    the lock held, for as long as its keepalive (hours): the healed server read its own session
    as another server's and refused spend until then. It ends its own orphaned session."""
    fwd = await _forwarder(pg_schema_dsn)
    up = await start_upstream()
    ledger = {"backend": "postgres", "dsn": _through(pg_schema_dsn, fwd.port), "flush_interval": 0.1}
    inst = await spawn(config_with_a_budget(up.base_url, ledger=ledger), name="silent")
    try:
        assert await answered(inst.url, 2) == 2
        await fwd.cut_one_side()
        await eventually(lambda: _lock_lost(inst.url), "the server not ready in the partition", within=20, every=0.2)
        await fwd.start()  # healed: new connections pass; PostgreSQL's side of the old session holds the lock

        await eventually(lambda: _answering(inst.url), "requests answered again", within=20, every=0.2)
        assert "taking requests again" in inst.output()
    finally:
        with contextlib.suppress(Exception):
            await fwd.cut()
