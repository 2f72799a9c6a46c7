"""`serve --workers 2` stopped as systemd stops a service (`KillMode=control-group`, the
default: SIGTERM to every process of the service at once) or as a terminal's Ctrl-C does (the
whole process group): each worker gets the stop from there and again from the supervisor,
which relays it. The workers drain: the stream in flight finishes, and every finished request
is in the ledger once the server exits.

The relayed SIGTERM reached a worker that had already begun draining and found SIGTERM's
default action back: the workers died at once (which the supervisor counted as a clean
drain, exit 0), cutting the stream and losing what the ledger had not written yet."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.scale.support import Spawn
from tests.test_cost_ledger import _drive
from tests.test_drain_repeated_signals import _stream


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_workers_drain_when_the_whole_group_is_signalled(
    spawn: Spawn, start_upstream: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    up = await start_upstream(chunk_interval=0.2)
    db = tmp_path / "l.db"
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"d-a": {"provider": "a", "model": "gpt-4o-mini"}},
        "models": {"m": {"deployments": ["d-a"]}},
        "ledger": {"path": str(db), "flush_interval": 1.0},
    }
    served = await spawn(cfg, "--workers", "2", name="w")
    stream = asyncio.create_task(_stream(served.url))
    done = await _drive(served.url, 0.5)
    os.killpg(served.proc.pid, sig)  # spawned in a session of its own: this group is the server's alone
    rid, raw = await stream
    assert await asyncio.wait_for(served.proc.wait(), 20) == 0
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and orjson.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    with sqlite3.connect(db) as c:
        stored = {r[0] for r in c.execute("SELECT request_id FROM spend")}
    assert stored == {r for r, _ in done} | {rid}
    with sqlite3.connect(db) as c:  # each once
        assert c.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == len(done) + 1
