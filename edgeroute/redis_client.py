"""The Redis client, imported on first use.

redis-py costs about 20 MB of memory when imported, and a proxy without `shared_state`
never talks to Redis: the modules that do get their client from `connect` and catch
`errors()`, so the package loads only when a config asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio as aioredis


def connect(url: str, *, no_retry: bool = False, **options: Any) -> aioredis.Redis:
    """A client for `url` (connections open on first command); `no_retry`: a failed command
    fails at once, for callers that fall back to local state rather than wait."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry  # the asyncio client's own: redis-py 8.2 warns on the sync one
    from redis.backoff import NoBackoff

    if no_retry:
        options["retry"] = Retry(NoBackoff(), 0)
    return aioredis.Redis.from_url(url, **options)


def errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is down, slow or refuses: its own errors, socket
    errors and timeouts. Evaluated where an exception is matched, after a client exists."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)
