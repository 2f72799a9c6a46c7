"""Two instances share a budget in Redis; Redis comes back empty while one of them cannot reach
it and holds settlements it could not send. The other refills the counters from the ledger;
then the first reaches Redis again and sends them. The budget must still hold what the ledger
says was spent: a request the refill read as spent is not given back again (it was, and the
budget undercounted), one it read as in flight (at its reservation) is."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from edgeroute.admission import ADMISSION
from edgeroute.config.schema import Budget, SharedState
from edgeroute.cost import budgets as B
from edgeroute.cost.control import CostControl
from edgeroute.cost.control import read_back as read_back_mod
from edgeroute.cost.redis_store import RedisState
from edgeroute.mock.openai import MockOptions, build_app
from tests.conftest import eventually
from tests.test_cost_support import LOADED_HOST_MS, RedisServer, budget_spent, cost_proxy, one_deployment

ADMIN = "sk-gen-admin"


class _Relay:
    """A TCP relay from a loopback port to Redis: one instance's own link, which the test cuts
    (its connections closed, new ones refused) and restores on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@contextlib.asynccontextmanager
async def _held_upstream() -> AsyncIterator[tuple[str, dict[str, asyncio.Event], list[str]]]:
    """The OpenAI mock (5-word answers), holding each request whose message names a gate until
    the test opens it; `arrived` lists the held requests that reached it."""
    gates: dict[str, asyncio.Event] = {"r1": asyncio.Event(), "r2": asyncio.Event()}
    arrived: list[str] = []

    @web.middleware
    async def hold(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        text = (await request.json())["messages"][-1]["content"] if request.method == "POST" else ""
        if text in gates:
            arrived.append(text)
            await gates[text].wait()
        return await handler(request)

    app = build_app(MockOptions(reply_words=5))
    app.middlewares.append(hold)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}/v1", gates, arrived
    finally:
        for g in gates.values():
            g.set()
        await server.close()


def _config(upstream: str, redis_url: str, prefix: str, ledger: Path) -> dict[str, Any]:
    budget = {"name": "g", "scope": "global", "limit_usd": 1.0, "period": "day"}
    return one_deployment(
        upstream,
        keys={"app": {"token": "sk-gen-app"}, "ops": {"token": ADMIN, "role": "admin"}},
        budgets={"limits": [budget]},
        ledger={"path": str(ledger), "flush_interval": 0.1},
        shared_state={"redis_url": redis_url, "prefix": prefix, "on_unavailable": "open", "timeout_ms": 500},
    )


async def _ask(client: openai.AsyncOpenAI, text: str) -> None:
    # Reserved for 50 completion tokens, answered with a handful: each settlement gives back.
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], max_tokens=50)


def _ledger_spend(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return sum(B.to_nano(usd) for (usd,) in db.execute("SELECT cost_usd FROM spend"))


def _settled(control: CostControl) -> bool:
    """Whether this instance has sent every settlement it made (none carried over or on its way)."""
    shared = control.shared
    assert isinstance(shared, RedisState)
    s = shared._settlements
    return not s._pending and s._flusher is None and not control._tasks


async def test_settlements_held_through_a_refill_count_each_request_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refill waits out the longest ledger flush interval, and held settlements are resent
    # every second: both shortened to this test's 0.1 s flush interval.
    monkeypatch.setattr(read_back_mod, "MAX_FLUSH_INTERVAL_S", 0.1)
    monkeypatch.setattr("edgeroute.cost.redis_settle.RESEND_S", 0.1)
    redis = RedisServer(tmp_path)
    redis.start()
    relay = _Relay(redis.port)
    await relay.open()
    ledger = tmp_path / "ledger.db"
    prefix = "gen-" + tmp_path.name[-8:]
    r = aioredis.Redis.from_url(redis.url)
    try:
        async with (
            _held_upstream() as (upstream, gates, arrived),
            cost_proxy(_config(upstream, f"redis://127.0.0.1:{relay.port}/0", prefix, ledger)) as a,
            cost_proxy(_config(upstream, redis.url, prefix, ledger)) as b,
        ):
            ca = openai.AsyncOpenAI(base_url=a.url + "/v1", api_key="sk-gen-app", max_retries=0)
            cb = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="sk-gen-app", max_retries=0)
            # A admits two requests through Redis; both wait at the provider.
            r1 = asyncio.create_task(_ask(ca, "r1"))
            r2 = asyncio.create_task(_ask(ca, "r2"))
            await eventually(lambda: _true(len(arrived) == 2), "both requests at the provider")
            # A loses Redis; r1 ends and settles: its give-back cannot be sent, A holds it.
            await relay.cut()
            gates["r1"].set()
            await r1
            await eventually(lambda: _true(_ledger_spend(ledger) > 0), "r1's spend in the ledger")
            # Redis comes back empty; B refills it from the ledger (r1 as spent, r2 in flight at
            # its reservation) and admits a request of its own.
            await r.flushall()
            await _ask(cb, "r3")
            # A reaches Redis again and sends what it held; then r2 ends there too.
            await relay.open()
            gates["r2"].set()
            await r2
            control = a.app[ADMISSION]
            assert isinstance(control, CostControl)
            await eventually(lambda: _true(_settled(control)), "A's settlements sent")
            await eventually(lambda: _true(_settled(b.app[ADMISSION])), "B's settlements sent")
            keys = [k async for k in r.scan_iter(match=f"{prefix}:b:g:*")]
            counted = int(await r.get(keys[0]) or 0)
            reported = await budget_spent(b.url, ADMIN, "g")
            await ca.close()
            await cb.close()
        spent = _ledger_spend(ledger)  # every record written (the proxies closed)
        # Three requests, each counted once at its cost: what every instance admits against, and
        # what an operator is shown, is what the ledger says was spent.
        assert spent > 0
        assert counted == spent, (counted, spent)
        assert round(reported * B.NANO) == spent
    finally:
        await r.aclose()
        await relay.cut()
        redis.stop()


async def _true(value: bool) -> bool:
    return value


async def test_a_later_refill_decides_by_what_it_read(tmp_path: Path) -> None:
    """Redis comes back empty twice; each time another instance refills it. Settlements made
    in the first generation and sent after the third follow what the last refill read: a
    request it read as spent is not given back (r1), one it read in flight is settled to its
    cost (r2 given back, r3 charged above its reservation). A rolling budget's slot likewise."""
    redis = RedisServer(tmp_path)
    redis.start()
    r = aioredis.Redis.from_url(redis.url)
    cfg = SharedState(redis_url=redis.url, prefix="gen3", timeout_ms=LOADED_HOST_MS)
    a, b, c = RedisState(cfg), RedisState(cfg), RedisState(cfg)
    try:
        now = time.time()
        day = Budget(name="d", scope="global", limit_usd=1.0, period="day")
        hours = Budget(name="h", scope="global", limit_usd=1.0, period="rolling", window_hours=1)
        charges = [B.charge(x, "*", B.period_of(x, now), 100, -1) for x in (day, hours)]
        keys = [(ch.store_key, ch.period.slot if ch.period.rolling else -1) for ch in charges]
        assert await b.seed({})
        made = [await a.reserve(charges, now) for _ in range(3)]  # r1, r2, r3: 100 each
        assert all(m.ok for m in made) and len({m.generation for m in made}) == 1

        async def refill(by: RedisState, spent: int, in_flight: list[str]) -> None:
            await r.flushall()  # Redis restarted empty
            assert await by.seed(dict.fromkeys(keys, spent), in_flight)

        await refill(b, 300, ["r1", "r2", "r3"])  # all three in flight
        await refill(c, 30 + 100 + 100, ["r2", "r3"])  # r1 ended, its cost (30) written
        # A sends what it held: r1 cost 30, r2 20, r3 120 (10 more than reserved and read back).
        for request_id, cost in (("r1", 30), ("r2", 20), ("r3", 120)):
            gen = made[0].generation
            await a.adjust_async(charges, [cost - ch.amount for ch in charges], gen, request_id)
        assert int(await r.get(f"gen3:b:{charges[0].store_key}") or 0) == 30 + 20 + 120
        rolling = await r.hget(f"gen3:b:{charges[1].store_key}", str(charges[1].period.slot))
        assert int(rolling or 0) == 30 + 20 + 120
        # Made in the generation Redis holds now, a give-back applies as it always did.
        again = await a.reserve(charges[:1], now)
        await a.adjust_async(charges[:1], [-100], again.generation, "r4")
        assert int(await r.get(f"gen3:b:{charges[0].store_key}") or 0) == 170
    finally:
        for s in (a, b, c):
            await s.close()
        await r.aclose()
        redis.stop()


def _day_and_hour(now: float, amount: int) -> list[B.Charge]:
    """A calendar and a rolling budget, one charge of `amount` nano-USD each."""
    day = Budget(name="d", scope="global", limit_usd=1.0, period="day")
    hours = Budget(name="h", scope="global", limit_usd=1.0, period="rolling", window_hours=1)
    return [B.charge(x, "*", B.period_of(x, now), amount, -1) for x in (day, hours)]


def _spent(charges: list[B.Charge], amount: int) -> dict[tuple[str, int], int]:
    """What a ledger read back says: `amount` for each charge's counter (`restore.read`'s keys)."""
    return {(ch.store_key, ch.period.slot if ch.period.rolling else -1): amount for ch in charges}


async def _counted(r: aioredis.Redis, prefix: str, charges: list[B.Charge]) -> list[int]:
    """Each charge's counter in Redis (a rolling budget's slot)."""
    day = int(await r.get(f"{prefix}:b:{charges[0].store_key}") or 0)
    hour = int(await r.hget(f"{prefix}:b:{charges[1].store_key}", str(charges[1].period.slot)) or 0)
    return [day, hour]


def _ledger(spent: dict[tuple[str, int], int], in_flight: list[str], reads: list[int]) -> Any:
    """A ledger read back (`RedisState.spent_from_ledger`) saying `spent`, with `in_flight`
    requests counted at their reservation; each read is appended to `reads`."""

    async def read() -> tuple[dict[tuple[str, int], int], list[str], list[tuple[str, str, int, float]]]:
        reads.append(1)
        return spent, in_flight, []

    return read


@contextlib.asynccontextmanager
async def _two_instances(tmp_path: Path, prefix: str) -> AsyncIterator[tuple[aioredis.Redis, RedisState, RedisState]]:
    """A Redis of the test's own, a client of it, and two instances' shared state in it."""
    redis = RedisServer(tmp_path)
    redis.start()
    r = aioredis.Redis.from_url(redis.url)
    cfg = SharedState(redis_url=redis.url, prefix=prefix, timeout_ms=LOADED_HOST_MS)
    a, b = RedisState(cfg), RedisState(cfg)
    try:
        yield r, a, b
    finally:
        for s in (a, b):
            await s.close()
        await r.aclose()
        redis.stop()


async def _all_sent(state: RedisState) -> None:
    s = state._settlements
    await eventually(lambda: _true(not s._pending and s._flusher is None), "every settlement sent")


async def test_a_give_back_sent_while_redis_is_empty_waits_for_the_refill(tmp_path: Path) -> None:
    """Redis restarted empty, and nothing refilled it yet, when an instance sends two
    give-backs (r1 cost 30 of its 100, r2 20). They were dropped (no counter, no marker), and
    the refill (another instance's admission found Redis empty) then counted r1 at its whole
    reservation. They wait for the refill, which decides by what it read: r1 in flight is given
    back, r2 already spent at its cost is not."""
    async with _two_instances(tmp_path, "held") as (r, a, b):
        now = time.time()
        charges = _day_and_hour(now, 100)
        assert await a.seed({})
        made = [await a.reserve(charges, now) for _ in range(2)]
        await r.flushall()  # Redis restarted empty
        reads: list[int] = []
        a.spent_from_ledger = b.spent_from_ledger = _ledger(_spent(charges, 100 + 20), ["r1"], reads)
        for request_id, cost in (("r1", 30), ("r2", 20)):
            await a.adjust_async(charges, [cost - 100] * 2, made[0].generation, request_id)
        await b.reserve(charges[:1], now)  # another instance's admission finds Redis empty: 100 more
        await _all_sent(a)
        assert await _counted(r, "held", charges) == [30 + 20 + 100, 30 + 20]
        assert reads == [1]  # one refill, from the ledger


async def test_an_upgrade_shares_no_generation_with_the_previous_release(tmp_path: Path) -> None:
    """The previous release marked its refills '1' under the same marker: a new instance
    reserving in a store it filled reserved in generation '1', and when Redis restarted and an
    old instance refilled it ('1' again), the new instance's held give-back looked current and
    was applied on top of a refill that had counted the request at its cost. The new release
    keeps its generations under a marker of its own: its first reservation reads the ledger
    back once (counters kept), and the give-back is decided by the new refill."""
    async with _two_instances(tmp_path, "upg") as (r, a, b):
        now = time.time()
        charges = _day_and_hour(now, 100)
        day, hour = (f"upg:b:{ch.store_key}" for ch in charges)

        async def old_refill(spent: int) -> None:  # Redis as the previous release's SEED left it
            await r.set(day, spent)
            await r.hset(hour, str(charges[1].period.slot), spent)
            await r.set("upg:budgets-seeded:2", "1")

        await old_refill(50)
        reads: list[int] = []
        a.spent_from_ledger = _ledger(_spent(charges, 50), [], reads)
        made = await a.reserve(charges, now)  # r1, 100
        assert made.ok
        assert await _counted(r, "upg", charges) == [150] * 2  # the read-back kept the counters
        await r.flushall()  # Redis restarted empty; an old instance refilled it: r1 cost 30
        await old_refill(50 + 30)
        await b.seed(_spent(charges, 80))  # and a new one, at its start
        await a.adjust_async(charges, [30 - 100] * 2, made.generation, "r1")
        await _all_sent(a)
        assert await _counted(r, "upg", charges) == [80] * 2
