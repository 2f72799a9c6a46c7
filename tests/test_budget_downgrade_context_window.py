"""A budget's downgrade never sends a prompt to a model whose context windows it exceeds.

Past a `downgrade` threshold every request was rerouted to the budget's `to` model, whatever
its length: a prompt the cheaper model cannot hold came back as a 400
`context_length_exceeded` naming a model the client never asked for (`cheap`), though the
model it asked for serves it. Now such a request goes to the next crossed budget's `to` that
holds it, or stays on its model (which the budget's `block` threshold still bounds), and
`x-edgeroute-explain` says why it was not downgraded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai

from tests.test_cost_support import cost_proxy

LONG = "tell me about the weather in paris " * 400  # ~2,800 tokens
SHORT = "hi"


def _config(upstreams: dict[str, Any], budgets: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    windows = {"big": 100_000, "mid": 20_000, "small": 1_000}
    # The first answer on `smart` (5 tokens) spends half the $1 budget: past every threshold below.
    output = {"big": 100_000.0, "mid": 1.0, "small": 0.1}
    return {
        "providers": {name: {"base_url": up.base_url, "api_key": f"key-{name}"} for name, up in upstreams.items()},
        "deployments": {
            f"d-{name}": {
                "provider": name,
                "model": "gpt-4o-mini",
                "context_window": windows[name],
                "price": {"input_per_mtok": 0, "output_per_mtok": output[name]},
            }
            for name in upstreams
        },
        "models": {
            "smart": {"deployments": ["d-big"]},
            "medium": {"deployments": ["d-mid"]},
            "cheap": {"deployments": ["d-small"]},
        },
        "ledger": {"path": str(tmp_path / "spend.db"), "flush_interval": 0.05},
        "budgets": {"limits": budgets},
    }


def _budget(name: str, to: str) -> dict[str, Any]:
    return {
        "name": name,
        "scope": "global",
        "limit_usd": 1.0,
        "actions": [{"at_percent": 10, "action": "downgrade", "to": to}],
    }


async def _ask(client: openai.AsyncOpenAI, content: str) -> Any:
    return await client.chat.completions.with_raw_response.create(
        model="smart", messages=[{"role": "user", "content": content}], max_tokens=5
    )


async def test_a_prompt_the_downgrade_model_cannot_hold_stays_on_its_model(start_upstream, tmp_path: Path) -> None:
    ups = {name: await start_upstream(reply_words=40, record=True) for name in ("big", "mid", "small")}
    async with cost_proxy(_config(ups, [_budget("month", "cheap")], tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        first = await _ask(client, SHORT)
        assert first.headers["x-edgeroute-route"] == "smart"  # spends past the threshold
        short = await _ask(client, SHORT)
        assert short.headers["x-edgeroute-route"] == "cheap"  # downgraded, as before

        long = await _ask(client, LONG)
        assert long.parse().choices[0].message.content  # served, not a 400 naming `cheap`
        assert long.headers["x-edgeroute-route"] == "smart"
        assert long.headers["x-edgeroute-deployment"] == "d-big"
        explain = long.headers["x-edgeroute-explain"]
        assert "not downgraded to cheap (budget month)" in explain, explain
        assert "context window" in explain, explain
        await client.close()

        # The same through /v1/messages, with the official Anthropic SDK.
        claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        raw = await claude.messages.with_raw_response.create(
            model="smart", max_tokens=5, messages=[{"role": "user", "content": LONG}]
        )
        assert (await raw.parse()).content  # anthropic: an async response
        assert raw.headers["x-edgeroute-route"] == "smart"
        assert "not downgraded to cheap" in raw.headers["x-edgeroute-explain"]
        await claude.close()
    assert len(ups["small"].options.requests) == 1  # only the short prompt went there


async def test_the_next_crossed_budgets_model_that_holds_it_serves_it(start_upstream, tmp_path: Path) -> None:
    ups = {name: await start_upstream(reply_words=40, record=True) for name in ("big", "mid", "small")}
    budgets = [_budget("tight", "cheap"), _budget("roomy", "medium")]
    async with cost_proxy(_config(ups, budgets, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        assert (await _ask(client, SHORT)).headers["x-edgeroute-route"] == "smart"
        assert (await _ask(client, SHORT)).headers["x-edgeroute-route"] == "cheap"  # the first crossed
        long = await _ask(client, LONG)
        assert long.parse().choices[0].message.content
        assert long.headers["x-edgeroute-route"] == "medium"
        assert "not downgraded to cheap (budget tight)" in long.headers["x-edgeroute-explain"]
        await client.close()
    assert len(ups["mid"].options.requests) == 1
