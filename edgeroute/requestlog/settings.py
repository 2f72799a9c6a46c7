"""The `request_log:` config section. Imports nothing of edgeroute's (the config imports it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RequestLog(BaseModel):
    """The request log lives in the ledger's database (SQLite by default, PostgreSQL), written in
    the ledger's batches. It keeps ids and numbers: no prompt, no answer, no token or key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    retention_days: float = Field(30.0, gt=0, le=3660)
    # SQLite only: past this size the oldest request records go first (the spend ledger stays).
    max_db_mb: float | None = Field(1024.0, gt=0)
