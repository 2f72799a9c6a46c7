"""The files that hold prompts and answers are readable by their owner alone.

With `request_log.log_content: full` (or `redacted`) the ledger's SQLite file holds prompts
and answers; the shadow log (`learning.shadow_log`) holds answers where the policy keeps them;
the governance store holds the audit log and the config's versions. Each was created with the
process's default mode (0644 under the usual umask 022): every user of the host could read the
prompts. A file edgeroute creates is now 0600 (SQLite's `-wal` and `-shm` take the database's
mode; the governance store opens its file the same way); a file already there keeps the
operator's.
"""

from __future__ import annotations

import logging
import sqlite3
import stat
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import eventually, shadow_config
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

PROMPT = "my diagnosis is confidential"
FREE = {"input_per_mtok": 0, "output_per_mtok": 0}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_the_ledger_and_the_shadow_log_are_created_readable_by_their_owner_alone(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream()
    db, shadow = tmp_path / "ledger.db", tmp_path / "shadow.jsonl"
    cfg = shadow_config(
        up.base_url,
        FREE,
        ledger={"path": str(db), "flush_interval": 0.05},
        request_log={"log_content": "full"},
        learning={"shadow_log": str(shadow)},
    )
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": PROMPT}]
        )
        await client.close()
        async with aiohttp.ClientSession() as s:
            await _wait_for(s, proxy.url + "/admin/requests?limit=5", 1)
            async with s.get(proxy.url + f"/admin/requests/{raw.headers['x-request-id']}") as r:
                assert PROMPT in (await r.json())["content"]["request"]  # the premise: the prompt is in the file

        async def written() -> bool:
            return shadow.exists() and shadow.stat().st_size > 0

        await eventually(written, "the pair in the shadow log")
        wal = tmp_path / "ledger.db-wal"
        assert wal.exists()
        modes = {p.name: oct(_mode(p)) for p in (db, wal, shadow)}
        assert set(modes.values()) == {oct(0o600)}, modes


@pytest.mark.parametrize("mode", [0o644, 0o600])
async def test_a_ledger_others_can_read_is_named_at_start(
    start_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    """A ledger made before files were created 0600 keeps its mode (the operator's): the start
    says so, rather than leave the prompts it will store readable in silence."""
    up = await start_upstream()
    db = tmp_path / "ledger.db"
    sqlite3.connect(db).close()  # an existing ledger, as an older edgeroute (or a umask 022) left it
    db.chmod(mode)
    cfg = {
        "providers": {"a": {"base_url": up.base_url}},
        "deployments": {"cheap": {"provider": "a", "model": "gpt-4o-mini", "price": FREE}},
        "models": {"m": {"deployments": ["cheap"]}},
        "ledger": {"path": str(db)},
        "request_log": {"log_content": "full"},
    }
    with caplog.at_level(logging.WARNING, logger="edgeroute.ledger"):
        async with cost_proxy(cfg):
            pass
    told = [r.getMessage() for r in caplog.records if "readable by other users" in r.getMessage()]
    if mode == 0o644:
        assert len(told) == 1 and str(db) in told[0] and "chmod 600" in told[0], told
    else:
        assert told == []
    assert _mode(db) == mode  # the operator's mode is never changed
