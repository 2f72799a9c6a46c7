"""Creating tables in a PostgreSQL database that several instances start against at once.

CREATE TABLE IF NOT EXISTS is not safe against a concurrent one in PostgreSQL: the loser fails
on pg_type's unique index, and the instance that lost exited at start. Every store takes this
transaction-scoped advisory lock before its schema statements, so they run one store at a time.
"""

from __future__ import annotations

from collections.abc import Callable

SCHEMA_LOCK = 7420  # one key for every store's schema: cost/ledger_lock.py holds 7421 for the ledger,
# governance/store.py takes 7422 to add a config version, 7423 for a capped key creation


def serialise(execute: Callable[[str], object]) -> None:
    """Hold the schema lock until the caller's transaction ends."""
    execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
