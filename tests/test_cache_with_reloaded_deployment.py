"""The response cache across a reload that points a deployment at another model.

Cached answers were tied to the deployment's *name* only: a reload that kept the name
`d-a` but changed its upstream model from gpt-4o-mini to gpt-4o went on serving the old
model's answers (as `gpt-4o-mini`, a hit) until their TTL, stale-if-error included. An
answer is now reused only while its deployment is still the same provider and model.
"""

from __future__ import annotations

from typing import Any

import openai
import yaml

from edgeroute import config as config_mod
from edgeroute.reload import apply_config
from tests.conftest import eventually, simple_config

QUESTION = [{"role": "user", "content": "Name a colour."}]


async def _reload(proxy: Any, cfg: dict[str, Any]) -> None:
    text = yaml.safe_dump(cfg)
    await apply_config(proxy.app, config_mod.loads(text, "test.yaml"), text, "api", None)


async def _cached_proxy(start_upstream: Any, start_proxy: Any) -> tuple[Any, Any, dict[str, Any], openai.AsyncOpenAI]:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 60, "stale_if_error": 600}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)

    async def stored() -> bool:  # the store is written off the request path
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
        return raw.headers["x-edgeroute-cache"] == "hit"

    await eventually(stored, "the first answer in the cache")
    return up, proxy, cfg, client


async def test_a_reload_to_another_model_under_the_same_name_does_not_serve_the_old_models_answers(
    start_upstream: Any, start_proxy: Any
) -> None:
    up, proxy, cfg, client = await _cached_proxy(start_upstream, start_proxy)
    cfg["deployments"]["d-a"]["model"] = "gpt-4o"
    await _reload(proxy, cfg)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "miss"
    assert up.options.requests[-1]["body"]["model"] == "gpt-4o"
    assert raw.parse().model == "gpt-4o"
    await client.close()


async def test_an_unchanged_deployment_keeps_its_answers_across_a_reload(start_upstream: Any, start_proxy: Any) -> None:
    up, proxy, cfg, client = await _cached_proxy(start_upstream, start_proxy)
    sent = len(up.options.requests)
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 3.0, "output_per_mtok": 4.0}  # not what answers
    await _reload(proxy, cfg)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=QUESTION, temperature=0)
    assert raw.headers["x-edgeroute-cache"] == "hit"
    assert len(up.options.requests) == sent
    await client.close()


async def test_stale_if_error_does_not_serve_the_old_models_answer(start_upstream: Any, start_proxy: Any) -> None:
    up, proxy, cfg, client = await _cached_proxy(start_upstream, start_proxy)
    cfg["deployments"]["d-a"]["model"] = "gpt-4o"
    await _reload(proxy, cfg)
    up.options.fail_status = 503  # every deployment fails now
    try:
        await client.chat.completions.create(model="m", messages=QUESTION, temperature=0)
        raise AssertionError("served an answer of a model this deployment no longer is")
    except openai.APIStatusError as e:
        assert e.status_code in (502, 503)
        assert e.response.headers["x-edgeroute-cache"] == "miss"
    await client.close()
