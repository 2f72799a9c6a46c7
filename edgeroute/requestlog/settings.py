"""The `request_log:` config section. Imports nothing of edgeroute's (the config imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LogContent = Literal["none", "redacted", "full"]
_PRIVACY: tuple[LogContent, ...] = ("none", "redacted", "full")  # most private first


def more_private(a: LogContent, b: LogContent) -> LogContent:
    """The more private of two content settings."""
    return a if _PRIVACY.index(a) <= _PRIVACY.index(b) else b


class RequestLog(BaseModel):
    """The request log lives in the ledger's database (SQLite by default, PostgreSQL), written in
    the ledger's batches. Prompts and answers are kept only where `log_content` says so: for
    every request (`log_content`), or per public model (`content_models`) or key id
    (`content_keys`); a key's setting wins over a model's, a model's over the default. A
    request's models are the one it asked for and the route that served it (an experiment's
    variant, a policy's choice, a budget's downgrade): where both are named, the more private
    setting holds.
    `redacted` replaces PII and credentials with typed markers; no token or provider key is
    ever stored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    retention_days: float = Field(30.0, gt=0, le=3660)
    # Past this size the oldest records of the tenant holding the most go first (the spend
    # ledger stays): SQLite's database file; PostgreSQL's request log as `request_holdings`
    # counts it, and only where the config writes it (`requestlog.store.capped`).
    max_db_mb: float | None = Field(1024.0, gt=0)
    log_content: LogContent = "none"
    content_models: dict[str, LogContent] = {}
    content_keys: dict[str, LogContent] = {}
    # A prompt or answer longer than this is cut (and marked cut) in the log.
    max_content_bytes: int = Field(64 * 1024, ge=256, le=16 * 1024 * 1024)
    # When more records than this wait for the writer (the database cannot keep up), the
    # oldest of them get no request-log row (their spend and the stats' rollups are still
    # written): the backlog drains at the writer's faster pace, and each one is counted in
    # `edgeroute_request_log_dropped_total`, rather than the queue growing without end.
    max_backlog: int = Field(25_000, ge=100)
    # The operator's queries (`/admin/requests`, `/admin/stats`, `/admin/spend`, the console's
    # pages): each is stopped past this many seconds (503 `query_timeout`), and one key has at
    # most this many in flight (429 `too_many_queries`), so that no viewer can hold the pool.
    query_timeout_s: float = Field(10.0, gt=0, le=600)
    max_queries_per_key: int = Field(2, ge=1, le=32)

    def content_for(self, asked: str, route: str, key: str | None) -> LogContent:
        """What is kept of a request for model `asked` served by `route` (the same name when
        nothing chose for the client)."""
        if not self.content_keys and not self.content_models:  # the usual config: one setting for all
            return self.log_content
        if key is not None and key in self.content_keys:
            return self.content_keys[key]
        named = [self.content_models[m] for m in (asked, route) if m in self.content_models]
        return min(named, key=_PRIVACY.index) if named else self.log_content
