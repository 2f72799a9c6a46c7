"""Routes an Anthropic SDK calls besides `messages.create` answer in Anthropic's shapes.

- An unknown path under `/v1/messages/` (the SDK's `messages.batches`) is a 404 in Anthropic's
  error format (`{"type": "error", "error": {"type": "not_found_error", ...}}`), not OpenAI's.
- `GET /v1/models` (`models.list()`) and `GET /v1/models/{id}` asked with `anthropic-version`
  (which the Anthropic SDK always sends) answer Anthropic's model objects (`type`,
  `display_name`, `created_at`) and page (`has_more`, `first_id`, `last_id`); an OpenAI client
  still gets OpenAI's.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import Proxy

CFG: dict[str, Any] = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k-secret-xx"}},
    "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
    "models": {"m1": {"deployments": ["d"]}, "m2": {"deployments": ["d"]}, "m3": {"deployments": ["d"]}},
}


def _anthropic(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)


def _is_anthropic_error(body: Any, etype: str) -> bool:
    return (
        isinstance(body, dict)
        and body.get("type") == "error"
        and body["error"]["type"] == etype
        and bool(body["error"]["message"])
    )


async def test_the_batches_api_is_an_anthropic_not_found(start_proxy) -> None:
    proxy: Proxy = await start_proxy(CFG)
    async with _anthropic(proxy) as client:
        with pytest.raises(anthropic.NotFoundError) as e:
            await client.messages.batches.list()
        assert _is_anthropic_error(e.value.body, "not_found_error"), e.value.body
        with pytest.raises(anthropic.NotFoundError) as e:
            await client.messages.batches.retrieve("msgbatch_1")
        assert _is_anthropic_error(e.value.body, "not_found_error"), e.value.body
    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/v1/messages/batches", json={}) as r:
        assert r.status == 404 and _is_anthropic_error(await r.json(), "not_found_error")


async def test_models_list_is_anthropics_for_an_anthropic_client(start_proxy) -> None:
    proxy: Proxy = await start_proxy(CFG)
    async with _anthropic(proxy) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["m1", "m2", "m3"]
        for m in page.data:
            assert m.type == "model" and m.display_name == m.id and m.created_at.year == 1970
        assert page.has_more is False and page.first_id == "m1" and page.last_id == "m3"
        # One at a time: the SDK pages on by `after_id` while `has_more`.
        assert [m.id async for m in await client.models.list(limit=1)] == ["m1", "m2", "m3"]
        before = await client.models.list(limit=1, before_id="m3")
        assert [m.id for m in before.data] == ["m2"] and before.has_more is True
        one = await client.models.retrieve("m2")
        assert (one.type, one.id, one.display_name) == ("model", "m2", "m2")
        with pytest.raises(anthropic.NotFoundError) as e:
            await client.models.retrieve("nope")
        assert _is_anthropic_error(e.value.body, "not_found_error"), e.value.body
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.models.list(limit=0)
        assert _is_anthropic_error(bad.value.body, "invalid_request_error"), bad.value.body


@pytest.mark.parametrize("limit", ["\u00b2", "\u2460", "\u0661", "1e1", " 5"])
async def test_a_models_limit_of_other_digits_is_a_400_not_a_500(start_proxy, limit: str) -> None:
    """`str.isdigit` says yes to a superscript two and to Arabic-Indic digits, which `int()`
    refused (a 500) or read (a page of some size): only ASCII digits are a limit."""
    proxy: Proxy = await start_proxy(CFG)
    async with _anthropic(proxy) as client:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.models.list(extra_query={"limit": limit})
        assert _is_anthropic_error(bad.value.body, "invalid_request_error"), bad.value.body


async def test_models_list_stays_openais_for_an_openai_client(start_proxy) -> None:
    proxy: Proxy = await start_proxy(CFG)
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        got = [m async for m in client.models.list()]
        assert [(m.id, m.object, m.owned_by) for m in got] == [(n, "model", "edgeroute") for n in ("m1", "m2", "m3")]
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("nope")
        assert isinstance(e.value.body, dict) and e.value.body.get("code") == "model_not_found"
