"""Rules that route priority classes apart (`when: priority`), end to end with the OpenAI SDK:
interactive requests to the fastest deployment by recent latency (`strategy: fastest`), batch
requests to the cheapest with time-of-day prices applied (`strategy: lowest_cost`)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from aiohttp import web

from tests.dispatch_support import StartProxy, answer
from tests.dispatch_support import upstreams as upstreams  # a fixture

RULES = [
    {"name": "interactive-fast", "when": {"priority": "interactive"}, "then": {"strategy": "fastest"}},
    {"name": "batch-cheap", "when": {"priority": ["batch"]}, "then": {"strategy": "lowest_cost"}},
]


def delayed(seconds: float) -> Any:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(seconds)
        return answer()

    return handler


async def _setup(upstreams: Any, start_proxy: StartProxy, fast_multiplier: float | None = None) -> openai.AsyncOpenAI:
    cfg = await upstreams(delayed(0.0), delayed(0.15))
    # d-a answers at once and costs ten times d-b, which takes 150 ms.
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 10.0, "output_per_mtok": 20.0}
    if fast_multiplier is not None:  # an off-peak window covering the whole day
        window = {"start": "00:00", "end": "24:00", "multiplier": fast_multiplier}
        cfg["deployments"]["d-a"]["price"]["windows"] = [window]
    cfg["rules"] = RULES
    proxy = await start_proxy(cfg)
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


async def _served(c: openai.AsyncOpenAI, priority: str | None) -> tuple[str, str | None]:
    headers = {"x-edgeroute-priority": priority} if priority else None
    raw = await c.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "q"}], extra_headers=headers
    )
    return raw.headers["x-edgeroute-deployment"], raw.headers.get("x-edgeroute-rule")


async def test_interactive_goes_to_the_fastest_and_batch_to_the_cheapest(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    c = await _setup(upstreams, start_proxy)
    # The default class matches no rule: weighted round robin measures both deployments.
    seen = {(await _served(c, None))[0] for _ in range(4)}
    assert seen == {"d-a", "d-b"}
    for _ in range(5):
        assert await _served(c, "interactive") == ("d-a", "interactive-fast")
        assert await _served(c, "batch") == ("d-b", "batch-cheap")


async def test_batch_follows_time_of_day_prices(upstreams: Any, start_proxy: StartProxy) -> None:
    # A window in force now makes the fast deployment the cheaper one (10 x 0.01 < 1).
    c = await _setup(upstreams, start_proxy, fast_multiplier=0.01)
    for _ in range(4):
        assert await _served(c, "batch") == ("d-a", "batch-cheap")


@pytest.mark.parametrize("when", [{"priority": "urgent"}, {"priority": ["batch", "bacth"]}])
def test_an_unknown_class_in_a_condition_is_a_config_error_naming_the_path(when: dict[str, Any]) -> None:
    from edgeroute.config import ConfigError, parse

    cfg = {
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "deployments": {"d": {"provider": "p", "model": "x"}},
        "models": {"m": {"deployments": ["d"]}},
        "rules": [{"name": "r", "when": when, "then": {"strategy": "fastest"}}],
    }
    with pytest.raises(ConfigError) as e:
        parse(cfg, "test.yaml")
    index = len(when["priority"]) - 1 if isinstance(when["priority"], list) else 0
    path = f"rules[0].when.priority[{index}]"
    assert any(path in err and "unknown priority class" in err for err in e.value.errors), e.value.errors


@pytest.mark.parametrize("value", ["Batch", "interactive,batch", "x" * 300])
async def test_a_class_header_that_names_no_class_is_a_400_in_the_api_format(
    upstreams: Any, start_proxy: StartProxy, value: str
) -> None:
    c = await _setup(upstreams, start_proxy)
    with pytest.raises(openai.BadRequestError) as e:
        await _served(c, value)
    body = e.value.response.json()["error"]
    assert body["code"] == "invalid_priority" and body["param"] == "x-edgeroute-priority"
    assert len(body["message"]) < 200  # a long value is not echoed whole
