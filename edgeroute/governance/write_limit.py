"""Admin writes a minute per writer: key changes (`governance.key_writes_per_minute`) and test
notifications (`POST /admin/alerts/test`).

A token bucket of `per_minute` tokens, refilled evenly over the minute. With `shared_state`
the bucket is in Redis (one script takes a token, with Redis's own clock), so instances and
workers that share it share the limit: each process kept its own, and `--workers 2` or two
instances gave a caller twice the limit. Without it, or while Redis does not answer (logged
once an outage), each process holds its own buckets.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from edgeroute import redis_client
from edgeroute.config import SharedState

log = logging.getLogger("edgeroute.governance")

# KEYS: the bucket. ARGV: tokens a minute. Returns the seconds until a token (0: one taken).
_TAKE = """
local rate = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(h[1] or '') or rate
local at = tonumber(h[2] or '') or now
tokens = math.min(rate, tokens + math.max(0, now - at) * rate / 60)
local wait = 0
if tokens < 1 then wait = (1 - tokens) * 60 / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
return tostring(wait)
"""


class WriteLimit:
    """Writes a minute per writer (a team, a key, a caller), in Redis with `shared`, else here."""

    def __init__(self, shared: SharedState | None = None, name: str = "writes") -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # writer -> (tokens, when, monotonic)
        self._client: Any = None
        self._prefix = ""
        self._down = False  # Redis failed the last take (said once an outage)
        if shared is not None:
            timeout = shared.timeout_ms / 1000
            self._client = redis_client.connect(
                shared.redis_url, no_retry=True, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            self._prefix = f"{shared.prefix}:{name}:"

    async def take(self, writer: str, per_minute: int) -> float:
        """0 when a write may go now (a token taken), else the seconds until one may."""
        if self._client is None:
            return self.take_here(writer, per_minute)
        bucket = self._prefix + hashlib.sha256(writer.encode()).hexdigest()[:32]  # any caller's name, bounded
        try:
            wait = float(await self._client.eval(_TAKE, 1, bucket, per_minute))
        except redis_client.errors() as e:
            if not self._down:
                log.warning(
                    "write limits: Redis does not answer (%s); each process limits on its own", type(e).__name__
                )
            self._down = True
            return self.take_here(writer, per_minute)
        if self._down:
            log.warning("write limits: Redis answers again; the limits are shared")
            self._down = False
        return wait

    def take_here(self, writer: str, per_minute: int) -> float:
        """`take` on this process's own buckets."""
        now = time.monotonic()
        tokens, at = self._buckets.get(writer, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - at) * per_minute / 60)
        if tokens < 1:
            self._buckets[writer] = (tokens, now)
            return (1 - tokens) * 60 / per_minute
        self._buckets[writer] = (tokens - 1, now)
        if len(self._buckets) > 10_000:  # writers idle a minute are full again: forget them
            self._buckets = {w: b for w, b in self._buckets.items() if now - b[1] < 60}
        return 0.0

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
