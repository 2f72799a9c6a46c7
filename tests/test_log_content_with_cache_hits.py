"""`request_log.log_content` with the response cache: a hit, a replayed stream and a hit a
budget lets through are logged as a miss is, prompt and answer.

A hit stored the prompt without its answer (the answer was taken only from an upstream
call), and a hit served past a spent budget stored neither: an auditor's `content_keys:
{auditor: full}` read requests without what they were told.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.test_cost_support import cost_proxy, one_deployment
from tests.test_requestlog import _wait_for

MSG: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 20
LIMIT = MAX_TOKENS * 2.0 / 1e6 * 1.5  # room for one reservation; after one answer, not for another


async def test_cache_hits_are_logged_with_their_answer(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        budgets={"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
        request_log={"log_content": "full"},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        rids, answers = [], []
        for stream in (False, False, True):  # a miss (the budget is spent), a hit past it, a replayed stream
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS, stream=stream
            )
            rids.append(raw.headers["x-request-id"])
            if stream:
                chunks = [c async for c in raw.parse()]
                answers.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            else:
                answers.append(raw.parse().choices[0].message.content)
        await client.close()
        assert len(up.options.requests) == 1 and answers[0]
        assert answers == [answers[0]] * 3
        logged = []
        async with aiohttp.ClientSession() as s:
            await _wait_for(s, proxy.url + "/admin/requests?limit=10", 3)
            for rid in rids:
                async with s.get(proxy.url + f"/admin/requests/{rid}") as r:
                    one = await r.json()
                content = one["content"] or {}
                logged.append((one["cache"], MSG[0]["content"] in (content.get("request") or ""),
                               answers[0] in (content.get("response") or "")))  # fmt: skip
    assert logged == [("miss", True, True), ("hit", True, True), ("hit", True, True)]
