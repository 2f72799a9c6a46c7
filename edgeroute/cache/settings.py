"""The response cache's configuration: per model (`models.NAME.cache`) and where entries live (`cache:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The most `max_entry_bytes` may be: a stored entry larger than this (and its header) was not
# written by edgeroute, and is read as a corrupt one (`entry.MAX_STORED_BYTES`).
MAX_ENTRY_BYTES = 32 * 1024 * 1024

# Chosen on the development half of the paraphrase / near-miss pairs (`python -m
# edgeroute.cache.evaluate`): the lowest threshold whose precision there is at least 0.99,
# with session 25's guards (the order guards since then would let the rule pick 0.84: kept
# at 0.91, never looser; see the evaluate module).
SEMANTIC_THRESHOLD = 0.91


class RouteCache(BaseModel):
    """How one public model's answers are cached.

    Only deterministic requests are cached by default (`temperature: 0` or a `seed`):
    replaying a sampled answer would silently change what the client asked for.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["exact", "semantic", "off"] = "exact"
    similarity: float = Field(
        SEMANTIC_THRESHOLD,
        gt=0,
        le=1,
        description="semantic mode: the least cosine similarity of two last user turns for a hit",
    )
    embedder: str | None = Field(
        None,
        description="semantic mode: a deployment (OpenAI-format provider) whose model embeds the last user turn "
        "through its /embeddings endpoint, instead of the built-in embedder; its similarity scale is its own, so "
        "set `similarity` for it",
    )
    embed_timeout_ms: float = Field(1000.0, gt=0, description="a slower embedding answer makes the lookup a miss")
    ttl: float = Field(300.0, gt=0, description="seconds an answer is served as fresh")
    stale_if_error: float = Field(
        0.0, ge=0, description="seconds past its ttl an answer may still be served when every deployment fails"
    )
    scope: Literal["key", "team", "global"] = Field(
        "key", description="who shares entries: one key, one team, or every caller"
    )
    deterministic_only: bool = True
    max_entries: int = Field(10_000, ge=1)
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_entry_bytes: int = Field(
        1024 * 1024, ge=1, le=MAX_ENTRY_BYTES, description="larger answers are not cached (at most 32 MiB)"
    )


class CacheStore(BaseModel):
    """Where entries live: in process (bounded LRU per model) or in Redis (`shared_state`), shared by instances."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["auto", "memory", "redis"] = Field(
        "auto", description="auto: Redis when `shared_state` is configured, else memory"
    )
    signing_key: str | None = Field(
        None,
        description="a secret every instance has (env:NAME, file:PATH, exec:COMMAND or a literal): entries in "
        "Redis are signed with it (HMAC-SHA256) and an unsigned or badly signed one is a miss, deleted; unset, "
        "`learning.experiment_salt` if set, else entries are not signed (whoever can write to Redis is trusted); "
        "read at start",
    )
