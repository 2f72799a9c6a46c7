"""With the request log's content off, no upstream's words are kept, however they quote the prompt.

`log_content: none` elided only quoted text with spaces (or past 40 characters) from an
attempt's error: an upstream echoing the prompt unquoted (`Bad input: <prompt>`), as one long
unspaced token, in «guillemets» or in a JSON-escaped quote (`"He said \\"hi\\" then …"`, the
tail after the inner quote kept) had it stored whole, in the database and in every view of the
request, a viewer's (whose `content` is withheld) included. Now only edgeroute's own message
is kept; the attempt's status and outcome say the rest.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.security.governed import ROOT, call
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _wait_for

VIEWER = "tok-viewer-0123456789"
SECRET = "the secret merger with Contoso"
ECHOES = {
    "unquoted": f"Bad input: {SECRET}",
    "unspaced": "Prompt was: " + SECRET.replace(" ", "_") + "_is_on_for_monday_9am",
    "guillemets": f"content filter triggered on: «{SECRET}»",
    "escaped quote": f'Invalid input: "He said \\"hi\\" then {SECRET}"',
}


@pytest.mark.parametrize("echo", list(ECHOES))
async def test_no_upstream_words_are_kept_with_content_off(start_upstream: Any, tmp_path: Path, echo: str) -> None:
    bad = await start_upstream(fail_status=500, fail_message=ECHOES[echo])
    good = await start_upstream()
    price = {"input_per_mtok": 1, "output_per_mtok": 1}
    cfg = {
        "providers": {"bad": {"base_url": bad.base_url}, "good": {"base_url": good.base_url}},
        "deployments": {
            "d-bad": {"provider": "bad", "model": "gpt-4o", "price": price},
            "d-good": {"provider": "good", "model": "gpt-4o", "price": {**price, "input_per_mtok": 2}},
        },
        "models": {"m": {"deployments": ["d-bad", "d-good"], "strategy": "lowest_cost"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "keys": {"root": {"token": ROOT, "role": "admin"}, "viewer": {"token": VIEWER, "role": "viewer"}},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": SECRET}]
        )
        await client.close()
        assert raw.headers["x-edgeroute-deployment"] == "d-good"  # failed over past the echo
        s.headers["Authorization"] = f"Bearer {ROOT}"
        await _wait_for(s, proxy.url + "/admin/requests?limit=5", 1)
        one = proxy.url + f"/admin/requests/{raw.headers['x-request-id']}"
        for key in (ROOT, VIEWER):
            status, seen = await call(s, "GET", one, key)
            assert status == 200, seen
            first = seen["attempts"][0]
            assert first["deployment"] == "d-bad" and first["status"] == 500, first
            assert "Contoso" not in str(seen) and "merger" not in str(seen), first["error"]
    with sqlite3.connect(tmp_path / "l.db") as db:
        dumped = "\n".join(db.iterdump())
    assert "Contoso" not in dumped and "merger" not in dumped
