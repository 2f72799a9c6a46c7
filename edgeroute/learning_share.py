"""The feedback learner's posteriors and recent requests shared between instances, in Redis.

With `shared_state`, feedback counts the same wherever it is posted and wherever the
request was served:

- each instance sends what it learned (the reward and its complement per (task, route))
  as `HINCRBYFLOAT`s on one hash, `{prefix}:learn:posteriors`, and every `SYNC_S` reads
  the hash back: every instance's posteriors are then the prior plus everyone's feedback;
- each routed request it served (route, task, cost) goes to `{prefix}:learn:req:{id}`
  for `REMEMBER_S`, so feedback posted to another instance finds it.

Both are sent in batches every `SYNC_S`, off the request path, in one transaction. Redis
down: feedback on requests this instance served still counts here until the next sync
(scores that could not be sent are not sent twice); feedback on another instance's
requests is answered 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from edgeroute import background, redis_client
from edgeroute.config import Config, SharedState
from edgeroute.learning import LEARNER, FeedbackLearner, Posterior, Served

log = logging.getLogger("edgeroute.learning")

SYNC_S = 0.5
LOOKUP_SLACK_S = 0.3  # the other instance's batch write, on top of its period
LOOKUP_POLL_S = 0.1
REMEMBER_S = 24 * 3600
MAX_PENDING = 100_000
_SEP = "\x1f"


class LearningShare:
    def __init__(self, cfg: SharedState, learner: FeedbackLearner) -> None:
        timeout = cfg.timeout_ms / 1000
        self.client = redis_client.connect(
            cfg.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0
        )
        self.learner = learner
        self.hash = f"{cfg.prefix}:learn:posteriors"
        self.req_prefix = f"{cfg.prefix}:learn:req:"
        self.rated_prefix = f"{cfg.prefix}:learn:rated:"
        self.served: list[tuple[str, Served]] = []
        self.rewards: list[tuple[str, str, float]] = []
        self.failed = 0

    def on_served(self, request_id: str, s: Served) -> None:
        if len(self.served) < MAX_PENDING:
            self.served.append((request_id, s))

    def on_feedback(self, s: Served, reward: float) -> None:
        if len(self.rewards) < MAX_PENDING:
            self.rewards.append((s.task, s.route, reward))

    async def lookup(self, request_id: str) -> Served | None:
        """A request another instance served, or None (unknown, expired, or Redis down). One
        served moments ago reaches Redis with that instance's next batch (every `SYNC_S`), so a
        miss is asked again until then: feedback sent right after the answer is not lost."""
        deadline = time.monotonic() + SYNC_S + LOOKUP_SLACK_S
        while True:
            try:
                raw = await self.client.get(self.req_prefix + request_id)
            except redis_client.errors():
                self.failed += 1
                return None
            if raw is not None:
                break
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(LOOKUP_POLL_S)
        route, task, cost = orjson.loads(raw)
        return Served(str(route), str(task), float(cost))

    async def claim(self, request_id: str) -> bool:
        """Whether this instance is the first to rate `request_id` (one request moves the shared
        learner once, whichever instances its score reaches); True when Redis is down (this
        instance's own memory decides, as without sharing)."""
        try:
            got = await self.client.set(self.rated_prefix + request_id, b"1", nx=True, ex=REMEMBER_S)
        except redis_client.errors():
            self.failed += 1
            return True
        return bool(got)

    async def flush(self) -> None:
        served, rewards = self.served, self.rewards
        if not served and not rewards:
            return
        self.served, self.rewards = [], []
        try:
            async with self.client.pipeline(transaction=True) as p:
                for rid, s in served:
                    p.set(self.req_prefix + rid, orjson.dumps([s.route, s.task, s.cost_usd]), ex=REMEMBER_S)
                for task, route, reward in rewards:
                    p.hincrbyfloat(self.hash, f"{task}{_SEP}{route}{_SEP}a", reward)
                    p.hincrbyfloat(self.hash, f"{task}{_SEP}{route}{_SEP}b", 1.0 - reward)
                await p.execute()
        except redis_client.errors():
            # Requests are sent again (a SET repeats harmlessly); rewards are not, since a
            # transaction that timed out may have applied, and a reward must not count twice.
            self.failed += 1
            self.served = (served + self.served)[:MAX_PENDING]
            log.warning("shared learning: %d feedback scores not shared (Redis unavailable)", len(rewards))
            raise

    async def sync(self) -> None:
        sums = await self.client.hgetall(self.hash)
        a0, b0 = self.learner.prior
        found: dict[tuple[str, str], Posterior] = {}
        for field, value in sums.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            task, route, which = name.split(_SEP)
            p = found.setdefault((task, route), Posterior(a0, b0))
            if which == "a":
                p.alpha = a0 + float(value)
            else:
                p.beta = b0 + float(value)
        self.learner.posteriors.update(found)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self.flush()
                await self.sync()
            except redis_client.errors() as e:
                log.warning("shared learning: Redis unavailable (%s)", type(e).__name__)

    async def close(self) -> None:
        with contextlib.suppress(*redis_client.errors()):
            await self.flush()
        await self.client.aclose()


def install(app: web.Application, config: Config) -> None:
    """With `shared_state` and a feedback learner, shares it (call after `learning.install`)."""
    learner = app.get(LEARNER)
    if learner is None or config.shared_state is None:
        return
    share = LearningShare(config.shared_state, learner)
    learner.share = share

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(share.run())
        yield
        await background.stop(task)  # its Redis calls can swallow one cancel() (Python 3.11)
        await share.close()

    app.cleanup_ctx.append(lifecycle)
