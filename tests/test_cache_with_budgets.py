"""The response cache with budgets: a hit costs nothing and, as the README says, reserves no
budget, so a budget with room left does not refuse a request the cache answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.test_cost_support import cost_proxy, one_deployment

MSG: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 20
RESERVED = MAX_TOKENS * 2.0 / 1e6  # the worst case at $2 per million output tokens (input is free here)
LIMIT = RESERVED * 1.5  # room for one reservation; after one answer of 10+ tokens, not for another


async def test_a_budget_with_room_left_does_not_refuse_a_cache_hit(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        labels = []
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS
            )
            labels.append(raw.headers["x-edgeroute-cache"])
            answer = raw.parse()
            # The premise: a whole answer (so it is stored) whose cost leaves no room for a reservation.
            assert answer.choices[0].finish_reason == "stop"
            assert answer.usage is not None and 10 <= answer.usage.completion_tokens < MAX_TOKENS
        assert labels == ["miss", "hit", "hit"]
        assert len(up.options.requests) == 1
        # A new question would cost more than the budget has left: refused, as it should be.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0, max_tokens=MAX_TOKENS
            )
        # Amounts below a cent keep three significant digits (they read "$0.0000 of $0.00").
        message = refused.value.message
        assert "of $0.0000600 spent or reserved" in message, message
        assert "$0.0000 " not in message


async def test_a_budgets_downgrade_serves_the_cached_answer_of_the_model_asked_for(
    start_upstream: Any, tmp_path: Path
) -> None:
    """Past a budget's downgrade threshold a request goes to the cheaper model, to spend less;
    one whose answer from the model asked for is in the cache spends nothing at all, and gets
    that answer, as a budget with no room left lets a hit through. Before, it was downgraded:
    paid for, and answered by the cheaper model (embeddings: vectors of another model)."""
    up = await start_upstream(record=True)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={
            "limits": [
                {
                    "name": "day",
                    "scope": "global",
                    "limit_usd": RESERVED * 3,
                    "period": "day",
                    "actions": [{"at_percent": 10, "action": "downgrade", "to": "cheap"}],
                }
            ]
        },
    )
    cfg["deployments"]["d-cheap"] = {
        "provider": "a",
        "model": "gpt-4o-nano",
        "price": {"input_per_mtok": 0, "output_per_mtok": 0.5},
    }
    cfg["models"]["cheap"] = {"deployments": ["d-cheap"]}
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        vectors = await client.embeddings.with_raw_response.create(model="m", input="Paris")  # costs nothing here
        assert vectors.headers["x-edgeroute-cache"] == "miss" and vectors.headers["x-edgeroute-deployment"] == "d-a"
        first = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS
        )
        assert first.headers["x-edgeroute-cache"] == "miss" and first.headers["x-edgeroute-deployment"] == "d-a"
        # Past the threshold now: a new question is downgraded.
        other = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "And of Spain?"}], temperature=0, max_tokens=MAX_TOKENS
        )
        assert other.headers["x-edgeroute-deployment"] == "d-cheap"
        again = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS
        )
        assert again.headers.get("x-edgeroute-cache") == "hit", again.headers
        assert again.headers["x-edgeroute-deployment"] == "d-a"
        assert float(again.headers["x-edgeroute-cost-usd"]) == 0
        assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
        # Embeddings alike: the cheaper model's vectors would not even compare with those cached.
        same = await client.embeddings.with_raw_response.create(model="m", input="Paris")
        assert same.headers.get("x-edgeroute-cache") == "hit" and same.headers["x-edgeroute-deployment"] == "d-a"
        assert same.parse().data[0].embedding == vectors.parse().data[0].embedding
        assert len(up.options.requests) == 3
        await client.close()


async def test_only_if_cached_with_a_spent_budget_is_a_504_miss_or_a_hit(start_upstream: Any, tmp_path: Path) -> None:
    """`x-edgeroute-cache: only-if-cached` never reaches an upstream, so it never spends: a
    spent budget refuses nothing it asks for. Its miss is the 504 `cache_miss` it is without a
    budget (not the budget's 429, whose Retry-After would send the client back at the reset
    for the same miss), and its hit is served."""
    up = await start_upstream(record=True)
    cfg = one_deployment(
        up.base_url,
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.1},
        budgets={"limits": [{"name": "day", "scope": "global", "limit_usd": LIMIT, "period": "day"}]},
    )
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    only = {"x-edgeroute-cache": "only-if-cached"}
    new = [{"role": "user", "content": "And of Spain?"}]
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        first = await client.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS)
        # The premise: the budget refuses a new question now.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="m", messages=new, temperature=0, max_tokens=MAX_TOKENS)
        assert refused.value.code == "budget_exceeded"
        with pytest.raises(openai.APIStatusError) as missed:
            await client.chat.completions.create(
                model="m", messages=new, temperature=0, max_tokens=MAX_TOKENS, extra_headers=only
            )
        assert missed.value.status_code == 504 and missed.value.code == "cache_miss", missed.value
        assert "retry-after" not in missed.value.response.headers
        hit = await client.chat.completions.with_raw_response.create(
            model="m", messages=MSG, temperature=0, max_tokens=MAX_TOKENS, extra_headers=only
        )
        assert hit.headers["x-edgeroute-cache"] == "hit"
        assert hit.parse().choices[0].message.content == first.choices[0].message.content
        assert len(up.options.requests) == 1
        await client.close()
