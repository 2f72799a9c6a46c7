"""`x-ratelimit-*` on a team key's answers show its own buckets, not a model's that every team
takes from: its remaining count is other teams' traffic, which `/admin/budgets` hides from team
keys (`shared`). A key of no team (an operator's) still sees the model's bucket."""

from __future__ import annotations

from typing import Any

import openai

from tests.governance_support import call
from tests.test_governance_keys import ADMIN, _cfg, _proxy


async def _headers(url: str, token: str) -> dict[str, str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}]
    )
    await client.close()
    return {k: v for k, v in raw.headers.items() if k.startswith("x-ratelimit-")}


async def test_a_team_key_does_not_see_other_teams_traffic_on_a_model_limit(start_upstream: Any) -> None:
    up = await start_upstream()
    cfg = _cfg(up, rate_limits={"models": {"m": {"rpm": 60}}})
    async with _proxy(cfg) as url:
        _, a = await call("POST", url + "/admin/keys", ADMIN, json={"team": "a"})
        _, b = await call("POST", url + "/admin/keys", ADMIN, json={"team": "b"})
        _, own = await call("POST", url + "/admin/keys", ADMIN, json={"team": "a", "rpm": 50})
        before = await _headers(url, a["secret"])
        for _ in range(5):
            await _headers(url, b["secret"])
        assert before == await _headers(url, a["secret"]) == {}  # nothing of the shared bucket
        mine = await _headers(url, own["secret"])  # its own limit, tighter by its share
        assert (mine["x-ratelimit-limit-requests"], mine["x-ratelimit-remaining-requests"]) == ("50", "49")
        operator = await _headers(url, ADMIN)  # no team: the model's bucket, other teams' requests in it
        assert operator["x-ratelimit-limit-requests"] == "60"
        assert int(operator["x-ratelimit-remaining-requests"]) < 59
