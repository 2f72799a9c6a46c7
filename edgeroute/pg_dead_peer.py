"""Bounds on a PostgreSQL session whose peer vanished without a word (a partition drops packets).

Without them a query on such a session waits for the kernel's TCP timeout, about 15 minutes:
the ledger lock's watcher did, and so did the managed keys' poll, which went on serving keys
revoked meanwhile. `CLIENT` goes to `psycopg.connect` (libpq's keepalives, and a send left
unacknowledged fails after 3 s); `SERVER` is run on the session so that PostgreSQL, too, ends a
vanished client's session (and the locks it holds) within seconds, not after its two hours.
"""

from __future__ import annotations

from typing import Any

CLIENT: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 3000,
}
SERVER = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3"
