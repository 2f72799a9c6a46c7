"""The names managed keys were given (`keys create --name`), read from the governance table
of the ledger's database, for the views that list keys by id: spend by key, the request log
and its stats by key. A managed key's id (`k230dcccb1b60`) says nothing to an operator; a
config key's id is its name already. Whoever may read those views may read the names: they
show nothing past what `/admin/spend?by=key` shows the same roles.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson


class Readable(Protocol):
    dialect: str

    def query(self, sql: str, params: list[Any]) -> list[tuple[Any, ...]]: ...


def key_names(db: Readable, ids: list[str]) -> dict[str, str]:
    """The names of those of `ids` that are named managed keys; none without managed keys."""
    exists = (
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'gov_keys'"
        if db.dialect == "sqlite"
        else "SELECT COUNT(*) FROM pg_tables WHERE tablename = 'gov_keys' AND schemaname = current_schema()"
    )
    ids = sorted(set(ids))
    if not ids or not db.query(exists, [])[0][0]:
        return {}
    rows = db.query(f"SELECT id, data FROM gov_keys WHERE id IN ({', '.join('?' * len(ids))})", ids)
    names = {str(i): orjson.loads(d).get("name") for i, d in rows}
    return {i: n for i, n in names.items() if isinstance(n, str)}
