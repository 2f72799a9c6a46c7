"""What a store shared between instances (Redis) or workers (SQLite) raises when it cannot
answer. What to do then (fail open to the in-process store, or closed) is the caller's policy."""

from __future__ import annotations


class StoreUnavailable(Exception):
    """The shared store did not answer (down, unreachable, timed out). `sent`: False when the
    command never reached it, so it certainly did not run."""

    def __init__(self, reason: str, sent: bool = True) -> None:
        super().__init__(reason)
        self.sent = sent
