"""`GET /admin/spend?since=` (a viewer's route) with a span longer than the calendar:
`99999999999999999d` (or a span of 400 digits) went back before any date a clock prints,
and the report's `since` could not be written: a 500 and a traceback in the proxy's log on
every call. A span further back than 1970 means from the start, as the request log reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy


async def test_a_span_past_any_date_is_the_whole_ledger(start_upstream: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()}, ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        for since in ("99999999999999999d", "9" * 400 + "h"):
            async with s.get(proxy.url + "/admin/spend", params={"since": since}) as r:
                assert r.status == 200, await r.text()
                body = await r.json()
            assert body["since"] == "1970-01-01T00:00:00Z"
