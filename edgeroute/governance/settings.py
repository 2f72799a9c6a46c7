"""The `governance:` section of the config: managed keys, residency, secrets refresh.

Schema only (pydantic models, no I/O); `edgeroute.config` holds one field of this type.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

REFERENCE_PREFIXES = ("env:", "file:", "exec:")  # as edgeroute.secrets reads them (schema only here)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Residency(_Strict):
    """Where a key's or team's requests may go: only deployments tagged `<tag_prefix><region>`."""

    tag_prefix: str = Field("region:", min_length=1)
    keys: dict[str, str] = {}  # config key id -> region
    teams: dict[str, str] = {}  # team -> region (managed keys of the team inherit it)

    def region_of(self, key_id: str | None, team: str | None, own: str | None = None) -> str | None:
        """A key's region: its team's when the team has one, else the key's own."""
        if team is not None and team in self.teams:
            return self.teams[team]
        if key_id is not None and key_id in self.keys:
            return self.keys[key_id]
        return own


class RollbackGuard(_Strict):
    """After a reload, watch the new config for `window_s`; past a bound, roll back by itself."""

    window_s: float = Field(60.0, gt=0, le=3600)
    max_error_rate: float | None = Field(0.5, gt=0, le=1)  # answers with a 5xx status, of all answers
    max_p95_ms: float | None = Field(None, gt=0)
    min_requests: int = Field(20, ge=1)  # no verdict on fewer answers


class Governance(_Strict):
    # Keys kept in the database (`/admin/keys`, `edgeroute keys`); with them on, every request
    # needs a key, as with `keys:`.
    managed_keys: bool = False
    # How often each instance looks for key changes in the database (revocation reaches every
    # instance within this interval plus one query).
    key_poll_interval: float = Field(0.25, gt=0, le=1.0)
    # How long an instance that cannot read the keys from PostgreSQL (a partition, the database
    # down) serves them as last read before it refuses managed keys (503) and is not ready: a
    # key revoked meanwhile works on it for up to this long; shorter, and a brief outage of the
    # database refuses every managed key. A SQLite store (one machine) is never stale.
    keys_stale_after_s: float = Field(30.0, ge=1.0, le=86400.0)
    # Live (not revoked, not expired) managed keys a team may hold, and keys of no team (the
    # operator's): every instance holds every key in memory, and a team's admin key makes keys.
    max_keys_per_team: int = Field(1000, ge=1, le=1_000_000)
    max_keys_without_team: int = Field(10_000, ge=1, le=1_000_000)
    # Key creations, changes and rotations a team (or a key of no team) may make a minute on
    # one instance (429 past it; revocations are never held back): each write is an audit
    # entry and a re-read on every instance.
    key_writes_per_minute: int = Field(120, ge=1, le=100_000)
    # Days the audit log keeps an entry (None: for ever); older ones go at most once an hour.
    audit_retention_days: float | None = Field(None, gt=0, le=36_500)

    @property
    def audit_retention_s(self) -> float | None:
        return self.audit_retention_days * 86400 if self.audit_retention_days is not None else None

    residency: Residency | None = None
    # Seconds between re-reads of `file:` and `exec:` secrets (a changed value is applied
    # without a restart; a failed re-read keeps the last good value).
    secrets_refresh: float = Field(30.0, ge=0.5)
    rollback_guard: RollbackGuard | None = None
    # The key literal secrets in stored config versions are sealed under (HMAC-SHA256), kept
    # outside the database: a reference (`env:`, `file:`, `exec:`). Without it they are sealed
    # under a key the store keeps beside them, so a copy of the whole database can check
    # guesses. Several keys split by spaces or commas: the first seals, the others (kept
    # through a rotation) still check the versions they sealed.
    versions_key: str | None = None

    @field_validator("versions_key")
    @classmethod
    def _a_reference(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(REFERENCE_PREFIXES):
            raise ValueError(
                "give the key as a reference (env:NAME, file:PATH or exec:COMMAND), kept out of the config"
            )
        return v
