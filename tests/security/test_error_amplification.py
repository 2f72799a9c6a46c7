"""An error message a client makes huge: a model named with megabytes was echoed whole and
redacted on the event loop (a 2.4 MB name held it 1.4 s, for every client) and stored whole
in the spend ledger and the request log; now an error message is cut before redaction
(never mid-secret: `redact.cut`) and a stored name is bounded."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from edgeroute import redact
from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

HUGE_NAME = "key=a&" * 400_000  # 2.4 MB; the `?key=` pattern makes it the slowest text to redact


async def _post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str]:
    async with s.post(url, json=body) as r:
        return r.status, await r.text()


async def test_a_huge_model_name_is_cut_in_the_error_and_in_the_ledger(start_upstream: Any, tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    cfg = simple_config({"a": await start_upstream()}, ledger={"path": str(db), "flush_interval": 0.05})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        msgs = [{"role": "user", "content": "hi"}]
        for path, body in (
            ("/v1/chat/completions", {"model": HUGE_NAME, "messages": msgs}),
            ("/v1/embeddings", {"model": HUGE_NAME, "input": "hi"}),
            ("/v1/messages", {"model": HUGE_NAME, "max_tokens": 5, "messages": msgs}),
        ):
            status, text = await _post(s, proxy.url + path, body)
            assert status == 404, (path, text[:200])
            assert len(text) < 16384 and "characters cut" in text, path  # [REDACTED] grows it a little
    with sqlite3.connect(db) as c:
        for table in ("requests", "spend"):
            lengths = [n for (n,) in c.execute(f"SELECT length(model) FROM {table}")]
            assert len(lengths) == 3 and max(lengths) <= 200, table


def test_the_cut_never_leaves_part_of_a_secret() -> None:
    secret = "quoted-provider-key-0123456789abcdef"
    redact.register(secret)
    for at in range(redact.MAX_MESSAGE - len(secret) - 2, redact.MAX_MESSAGE + 2):
        for sep in (" ", "=", '"', ","):
            out = redact.message("x" * at + sep + secret + sep + "tail " * 2000)
            assert "characters cut" in out and secret[:8] not in out, (at, sep)
