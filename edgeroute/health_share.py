"""Deployment ejections shared between instances over Redis, so an outage is paid for once.

When this instance's core opens a deployment's circuit or starts a rate-limit cool-down
(a 429 with `Retry-After`), the others take the deployment out too, within about
`WATCH_S` plus one Redis round trip; each instance still keeps its own latency and error
estimates, and probes the deployment itself once the shared ejection runs out.

- Detection is a watcher, off the request path: every `WATCH_S` it reads each
  deployment's health from the core and publishes what changed (a circuit that just
  opened, a cool-down that is new or longer). Changes this instance applied from others
  are recognised and not sent back, so two instances never extend each other's ejection.
- Each event goes out twice: a PUBLISH for the instances listening now, and a key with
  the event's TTL (`{prefix}:health:{kind}:{deployment}`) that an instance reads when it
  (re)connects, so one started or restarted during an outage knows it at once. Redis's
  own TTL says how much is left, whatever the instances' clocks say.
- An opened circuit is shared for `health.base_ejection_ms` (the core does not say how
  long its own, growing, ejection lasts); a cool-down for what is left of it. An instance
  whose own recent traffic the deployment serves well does not apply a received ejection
  (it may be one client's doing on the other instance); it opens by its own failures.

Redis down: nothing is shared (each instance learns by its own failures, as without
`shared_state`), and the subscriber reconnects every second.

Without `shared_state`, the workers of one `serve --workers N` share the same events over
Unix datagram sockets in the supervisor's run directory (`LocalBus`); a worker restarted
during an outage learns of it by its own failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from edgeroute import background, redis_client
from edgeroute.config import Config, SharedState
from edgeroute.metrics import METRICS
from edgeroute.state import STATE
from edgeroute.workers import worker as workers
from edgeroute.workers.worker import Worker

log = logging.getLogger("edgeroute.health")

WATCH_S = 0.1
_SLACK_S = 0.1  # cool-down ends closer than this are the same cool-down
_OPEN, _COOL = "open", "cooldown"


class RedisBus:
    """Events through Redis: PUBLISH to the instances listening, and a key with a TTL for later ones."""

    def __init__(self, cfg: SharedState) -> None:
        self.channel = f"{cfg.prefix}:health"
        self.key_prefix = f"{cfg.prefix}:health:"
        timeout = cfg.timeout_ms / 1000
        self.client = redis_client.connect(
            cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
        )
        # The subscriber waits on its connection indefinitely: no read timeout there.
        self.listener = redis_client.connect(cfg.redis_url, socket_connect_timeout=timeout, health_check_interval=30)

    async def publish(self, event: bytes, key: str, ms: int) -> None:
        try:
            async with self.client.pipeline(transaction=True) as p:
                p.set(self.key_prefix + key, b"1", px=ms)
                p.publish(self.channel, event)
                await p.execute()
        except redis_client.errors() as e:
            raise BusError(type(e).__name__) from None

    async def listen(self, share: HealthShare) -> None:
        while True:
            try:
                async with self.listener.pubsub(ignore_subscribe_messages=True) as ps:
                    await ps.subscribe(self.channel)
                    # Catch up with the ejections in force now (on every (re)connect).
                    async for key in self.client.scan_iter(match=self.key_prefix + "*", count=200):
                        kind, _, dep = key.decode()[len(self.key_prefix) :].partition(":")
                        ms = await self.client.pttl(key)
                        if ms > 0:
                            share.apply(dep, kind, int(ms))
                    while True:
                        msg = await ps.get_message(timeout=1.0)
                        if msg is not None:
                            share.on_event(msg["data"])
            except asyncio.CancelledError:
                raise
            except redis_client.errors() as e:
                share.failed += 1
                log.warning("shared health: Redis unavailable (%s); retrying in 1 s", type(e).__name__)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self.client.aclose()
        await self.listener.aclose()


class LocalBus:
    """Events between the workers of one machine: a datagram to each sibling's socket."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = worker.dir / f"health-{worker.id}.sock"
        path.unlink(missing_ok=True)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.peers = [str(worker.dir / f"health-{i}.sock") for i in range(worker.count) if i != worker.id]

    async def publish(self, event: bytes, key: str, ms: int) -> None:
        for peer in self.peers:
            with contextlib.suppress(OSError):  # a sibling restarting: it learns by itself
                self.sock.sendto(event, peer)

    async def listen(self, share: HealthShare) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    data = self.sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    return
                share.on_event(data)

        loop.add_reader(self.sock.fileno(), readable)
        try:
            await asyncio.Event().wait()
        finally:
            loop.remove_reader(self.sock.fileno())

    async def close(self) -> None:
        self.sock.close()


class BusError(Exception):
    """An event could not be sent."""


class Bus(Protocol):
    async def publish(self, event: bytes, key: str, ms: int) -> None: ...
    async def listen(self, share: HealthShare) -> None: ...
    async def close(self) -> None: ...


class HealthShare:
    """Publishes this instance's ejections and applies the others'."""

    def __init__(self, app: web.Application, bus: Bus) -> None:
        self.app = app
        self.bus = bus
        self.instance = secrets.token_hex(6)
        self.sent = 0
        self.received = 0
        self.failed = 0
        self.not_applied = 0  # opens received while the deployment served this instance well
        self._open: dict[str, bool] = {}
        self._cool_end: dict[str, float] = {}
        # Until when (monotonic) an ejection or cool-down applied from another instance runs.
        self._remote_open: dict[str, float] = {}
        self._remote_cool: dict[str, float] = {}

    # -- applying others' events -----------------------------------------------

    def apply(self, dep: str, kind: str, ms: int) -> None:
        live = self.app[STATE].live
        idx = live.index_of.get(dep)
        if idx is None or ms <= 0:
            return  # not a deployment of this config generation
        now = time.monotonic()
        router = live.router
        if kind == _OPEN:
            # The other instance may have seen one sender's failures alone (a client making a
            # deployment fail on purpose, sent to an instance others do not use): a deployment
            # that serves this instance's traffic well stays in; a real outage soon fails the
            # requests here too, and this instance opens by its own failures.
            if router.serving_well(idx):
                self.not_applied += 1
                return
            self._remote_open[dep] = now + ms / 1000
            if router.health(idx)["circuit"] != "open":
                router.set_probe_result(idx, False, ms)
        elif kind == _COOL:
            self._remote_cool[dep] = max(self._remote_cool.get(dep, 0.0), now + ms / 1000)
            router.begin(idx)  # `report` ends an attempt: pair it with a start
            router.report(idx, "rate_limited", 0.0, ms)
        else:
            return
        self.received += 1

    def on_event(self, data: bytes) -> None:
        try:
            ev = orjson.loads(data)
            if ev["i"] != self.instance:
                self.apply(str(ev["d"]), str(ev["k"]), int(ev["ms"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("shared health: ignored a malformed event")

    # -- publishing this instance's events -------------------------------------

    def changes(self) -> list[tuple[str, str, int]]:
        """What changed in this instance's own view of health since the last call."""
        live = self.app[STATE].live
        now = time.monotonic()
        base_ms = live.config.health.base_ejection_ms
        out = []
        for d in live.deployments:
            h = live.router.health(d.index)
            name = d.name
            is_open = h["circuit"] == "open"
            was_open = self._open.get(name, False)
            self._open[name] = is_open
            if is_open and not was_open and now >= self._remote_open.get(name, 0.0) and base_ms > 0:
                out.append((name, _OPEN, base_ms))
            cool_ms = h["cooldown_ms"]
            if cool_ms > 0:
                end = now + cool_ms / 1000
                if end > self._cool_end.get(name, 0.0) + _SLACK_S:
                    self._cool_end[name] = end
                    if end > self._remote_cool.get(name, 0.0) + _SLACK_S:
                        out.append((name, _COOL, int(cool_ms)))
        return out

    async def publish(self, dep: str, kind: str, ms: int) -> None:
        event = orjson.dumps({"i": self.instance, "d": dep, "k": kind, "ms": ms})
        await self.bus.publish(event, f"{kind}:{dep}", ms)
        self.sent += 1

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                changes = self.changes()
            except Exception:  # a bug here must not end sharing for the life of the process
                log.exception("shared health: reading health failed")
                continue
            for dep, kind, ms in changes:
                try:
                    await self.publish(dep, kind, ms)
                except BusError as e:
                    self.failed += 1
                    log.warning("shared health: could not publish %s of %s (%s)", kind, dep, e)

    def metrics(self, _: web.Application) -> Iterable[Metric]:
        c = CounterMetricFamily(
            "edgeroute_shared_health_events",
            "Deployment ejections and cool-downs shared with other instances, by direction (not_applied: "
            "an ejection received while the deployment served this instance's traffic well).",
            labels=["direction"],
        )
        c.add_metric(["sent"], self.sent)
        c.add_metric(["received"], self.received)
        c.add_metric(["failed"], self.failed)
        c.add_metric(["not_applied"], self.not_applied)
        yield c


HEALTH_SHARE = web.AppKey("health_share", HealthShare)


def install(app: web.Application, config: Config) -> None:
    """Shares ejections with the other instances (`shared_state`) or the sibling workers
    (`serve --workers N`); nothing otherwise. Call after METRICS is set."""
    worker = workers.current()
    bus: Bus
    if config.shared_state is not None:
        bus = RedisBus(config.shared_state)
    elif worker is not None and worker.count > 1:
        bus = LocalBus(worker)
    else:
        return
    share = app[HEALTH_SHARE] = HealthShare(app, bus)
    app[METRICS].sources.append(share.metrics)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(bus.listen(share)), asyncio.create_task(share.watch())]
        yield
        await background.stop(*tasks)
        await bus.close()

    app.cleanup_ctx.append(lifecycle)
