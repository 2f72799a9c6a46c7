"""One notification per alert transition across the instances that share Redis.

With `shared_state`, every instance evaluates the alert rules, and the kinds every
instance sees alike (budgets, circuits shared through health sharing, secrets) fire in
each of them. Before notifying such a transition (firing or resolved), an instance claims
it in Redis: a hash per (rule, subject), `{prefix}:alerts:{rule}:{subject}`, holds the
last transition (`state`, a generation `gen`, `done` once delivered, when it last fired for
the shared cooldown, whether its firing was held back by it), and a claim key beside it,
with a TTL as long as the delivery may take, names the instance sending it. One script
does the check and the claim atomically, with Redis's own clock:

- a new transition: claimed by the first instance that asks, which sends it; the others
  find it claimed ("pending") or done, and send nothing;
- the claimer killed mid-way (its claim expires before it marks the transition done): an
  instance still waiting on it takes the claim over (SET NX) and sends it again, once
  per expiry: so at most one duplicate, never a loss while another instance sees it;
- a transition that a later one superseded is dropped by those still waiting on it.

Redis down or slow: the instance notifies by itself (alerting fails open), counted in
`edgeroute_alert_claims_total{result="unavailable"}` and logged. Each instance sends the
transitions of one (rule, subject) in order, one at a time, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from edgeroute import redis_client
from edgeroute.config import SharedState
from edgeroute.telemetry.notify import Notification, Notifier, longest_delivery_s

log = logging.getLogger("edgeroute.alerts")

RETRY_S = 1.0  # how often an instance waiting on another's claim looks again
KEEP_MS = 7 * 86400 * 1000  # a (rule, subject)'s record outlives any cooldown worth having
_MARGIN_S = 5.0

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"

# KEYS: the record, the claim. ARGV: event, claimer, claim ms, cooldown s, expected gen ('' if new), keep ms,
# the alert (JSON: a firing one is kept, for an instance that restarts to resolve it).
_BEGIN = """
local event, me, want, keep = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local claim_ms, cooldown = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'state', 'done', 'gen', 'notified_at', 'silenced')
local gen = tonumber(h[3] or '0')
if want ~= '' and tonumber(want) ~= gen then return {'superseded', gen} end
if h[1] == event then
  if h[2] == '1' then return {'done', gen} end
  if redis.call('SET', KEYS[2], me .. '/' .. gen, 'NX', 'PX', claim_ms) then return {'retry', gen} end
  return {'pending', gen}
end
gen = gen + 1
local silenced = '0'
if event == 'firing' then
  local last = tonumber(h[4] or '')
  if last and now - last < cooldown then silenced = '1' end
elseif h[5] == '1' then
  silenced = '1'
end
redis.call('HSET', KEYS[1], 'state', event, 'gen', gen, 'silenced', silenced, 'done', silenced)
if event == 'firing' then redis.call('HSET', KEYS[1], 'alert', ARGV[7]) end
if event == 'firing' and silenced == '0' then redis.call('HSET', KEYS[1], 'notified_at', tostring(now)) end
redis.call('PEXPIRE', KEYS[1], keep)
if silenced == '1' then return {'silenced', gen} end
redis.call('SET', KEYS[2], me .. '/' .. gen, 'PX', claim_ms)
return {'send', gen}
"""
# KEYS: the record, the claim. ARGV: gen, claimer.
_FINISH = """
if redis.call('HGET', KEYS[1], 'gen') == ARGV[1] then redis.call('HSET', KEYS[1], 'done', '1') end
if redis.call('GET', KEYS[2]) == ARGV[2] .. '/' .. ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

RESULTS = ("sent", "retried", "skipped", "silenced", "unavailable")
MAX_ADOPTED = 1000  # firing alerts taken up at start


def _glob(text: str) -> str:
    """`text` matched literally in a Redis SCAN pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


@dataclass(slots=True)
class Transition:
    event: str  # firing | resolved
    webhooks: list[str]
    alert: dict[str, object]
    cooldown_s: float
    gen: str = ""  # the generation found claimed by another instance


class AlertClaims:
    """Claims each shared transition in Redis before notifying it (see the module's doc)."""

    def __init__(self, cfg: SharedState, notifier: Notifier) -> None:
        self.prefix = f"{cfg.prefix}:alerts:"
        self.notifier = notifier
        timeout = cfg.timeout_ms / 1000
        self.client = redis_client.connect(
            cfg.redis_url, no_retry=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self.counts = dict.fromkeys(RESULTS, 0)
        self._waiting: dict[tuple[str, str], deque[Transition]] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def submit(self, rule: str, subject: str, t: Transition) -> None:
        """Queues a transition of (rule, subject); called from the (synchronous) evaluation."""
        key = (rule, subject)
        self._waiting.setdefault(key, deque()).append(t)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key))

    async def _drain(self, key: tuple[str, str]) -> None:
        waiting = self._waiting[key]
        try:
            while waiting:
                if await self._step(key, waiting[0]):
                    waiting.popleft()
                else:
                    await asyncio.sleep(RETRY_S)
        finally:
            del self._tasks[key]
            if not waiting:
                del self._waiting[key]

    async def _step(self, key: tuple[str, str], t: Transition) -> bool:
        """One try at `t`: True when it is settled (sent here, or elsewhere, or not to be sent)."""
        record = self.prefix + f"{key[0]}:{key[1]}"
        claim = record + ":claim"
        hooks = [self.notifier.webhooks[n] for n in t.webhooks if n in self.notifier.webhooks]
        claim_ms = int((sum(longest_delivery_s(h) for h in hooks) + _MARGIN_S) * 1000)
        args = (t.event, INSTANCE, claim_ms, t.cooldown_s, t.gen, KEEP_MS, orjson.dumps(t.alert))
        try:
            result, gen = await self.client.eval(_BEGIN, 2, record, claim, *args)
        except redis_client.errors() as e:
            self.counts["unavailable"] += 1
            log.warning(
                "alert %s %s: Redis unavailable (%s); notifying from this instance alone",
                key[0], t.event, type(e).__name__,
            )  # fmt: skip
            await self._send(t)
            return True
        result, gen = result.decode() if isinstance(result, bytes) else str(result), str(gen)
        if result == "pending":
            t.gen = gen
            return False
        if result in ("done", "superseded"):
            self.counts["skipped"] += 1
            return True
        if result == "silenced":
            self.counts["silenced"] += 1
            return True
        self.counts["sent" if result == "send" else "retried"] += 1
        await self._send(t)
        try:
            await self.client.eval(_FINISH, 2, record, claim, gen, INSTANCE)
        except redis_client.errors() as e:  # the claim expires: another instance may send it again
            log.warning("alert %s %s: could not mark it sent (%s)", key[0], t.event, type(e).__name__)
        return True

    async def _send(self, t: Transition) -> None:
        for name in t.webhooks:
            await self.notifier.deliver(Notification(name, t.event, t.alert))

    def metrics(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(
            "edgeroute_alert_claims",
            "Shared alert transitions by what this instance did: sent, retried (another's claim expired), "
            "skipped (another instance sent it), silenced (shared cooldown), unavailable (Redis down: sent alone).",
            labels=["result"],
        )
        for result, n in self.counts.items():
            fam.add_metric([result], n)
        yield fam

    async def firing(self) -> list[dict[str, Any]]:
        """The shared alerts whose last transition Redis holds is "firing", as they were sent
        (at most `MAX_ADOPTED`): an instance that starts takes them up (`AlertEngine.adopt`), so
        that it resolves them. They lived in the process that raised them alone: one killed (or
        restarted) while an alert fired, the alert clear when it came back, left its "firing"
        the webhook's last word. Raises Redis's errors."""
        found: list[dict[str, Any]] = []
        async for key in self.client.scan_iter(match=_glob(self.prefix) + "*", count=500):
            if key.endswith(b":claim"):
                continue
            state, alert = await self.client.hmget(key, ["state", "alert"])
            if state == b"firing" and alert:
                with contextlib.suppress(orjson.JSONDecodeError):
                    found.append(orjson.loads(alert))
            if len(found) >= MAX_ADOPTED:
                break
        return found

    async def flush(self) -> None:
        """Until the transitions being claimed and sent are settled; the caller bounds it."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.client.aclose()
