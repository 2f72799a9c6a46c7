"""A key held to some models (`--model`, `"models"`) is listed those models alone.

`GET /v1/models` listed every model of the config to every key, and `GET /v1/models/{id}`
answered 200 for a model the key is refused (and chat a 403 `model_not_allowed`): a client
(a chat UI, an SDK's model picker) offered models its key cannot use, and a key learnt the
names of every other team's models. As OpenAI's API does, the list holds what the key may
use, and another model is the 404 of one that does not exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import simple_config
from tests.security.governed import ROOT, USER, call
from tests.test_cost_support import cost_proxy


async def test_a_key_held_to_a_model_lists_and_retrieves_that_model_alone(start_upstream: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["models"] |= {"research-large": {"deployments": ["d-a"]}, "finance-only": {"deployments": ["d-a"]}}
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, made = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "research", "models": ["m"]})
        assert status == 201, made
        held = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=made["secret"], max_retries=0)
        root = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
        try:
            assert [m.id for m in (await held.models.list()).data] == ["m"]
            assert (await held.models.retrieve("m")).id == "m"
            with pytest.raises(openai.NotFoundError) as e:
                await held.models.retrieve("finance-only")
            assert e.value.status_code == 404 and e.value.code == "model_not_found"
            # What the listing says is what it may ask for; another team's model is answered as one
            # that does not exist, word for word (a 403 confirmed that the name exists).
            refused = []
            for model in ("finance-only", "no-such-model"):
                with pytest.raises(openai.NotFoundError) as e:
                    await held.chat.completions.create(model=model, messages=USER, max_tokens=5)
                refused.append((e.value.status_code, e.value.body))
            assert refused[0][0] == refused[1][0] == 404
            assert str(refused[0][1]).replace("finance-only", "X") == str(refused[1][1]).replace("no-such-model", "X")
            await held.chat.completions.create(model="m", messages=USER, max_tokens=5)
            # A key without a bound lists every model, as before.
            assert sorted(m.id for m in (await root.models.list()).data) == ["finance-only", "m", "research-large"]
            assert (await root.models.retrieve("finance-only")).id == "finance-only"
        finally:
            await held.close()
            await root.close()


LONG: Any = [{"role": "user", "content": "word " * 400}]


def _with_finance_only(up: Any, tmp_path: Path) -> dict[str, Any]:
    """A config with model `finance-only` (a 50-token window) and managed keys."""
    cfg = simple_config({"a": up})
    cfg["deployments"]["d-f"] = cfg["deployments"]["d-a"] | {"context_window": 50}
    cfg["models"] |= {"finance-only": {"deployments": ["d-f"]}}
    cfg |= {
        "keys": {"root": {"token": ROOT, "role": "admin"}},
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    return cfg


async def test_a_held_key_learns_nothing_of_another_model_from_its_context_window(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A prompt longer than another team's model's context window was refused by that window
    (400 `context_length_exceeded`, naming it) before the key's bound was checked, while a model
    that does not exist was a 404: the key could tell which names exist, and their windows."""
    cfg = _with_finance_only(await start_upstream(), tmp_path)
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, made = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "research", "models": ["m"]})
        assert status == 201, made
        held = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=made["secret"], max_retries=0)
        claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=made["secret"], max_retries=0)
        try:
            said: dict[str, list[tuple[int, str]]] = {}
            for model in ("finance-only", "no-such-model"):
                with pytest.raises(openai.APIStatusError) as e:
                    await held.chat.completions.create(model=model, messages=LONG, max_tokens=5)
                with pytest.raises(anthropic.APIStatusError) as a:
                    await claude.messages.count_tokens(model=model, messages=LONG)
                said[model] = [(x.status_code, str(x.body).replace(model, "X")) for x in (e.value, a.value)]
            assert said["finance-only"] == said["no-such-model"]
            assert [status for status, _ in said["finance-only"]] == [404, 404]
            # The root key still hears the window of a model it may use.
            root = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ROOT, max_retries=0)
            with pytest.raises(openai.BadRequestError, match="maximum context length is 50"):
                await root.chat.completions.create(model="finance-only", messages=LONG, max_tokens=5)
            await root.close()
        finally:
            await held.close()
            await claude.close()


async def test_a_held_key_learns_nothing_of_another_model_through_a_field_orjson_refuses(
    start_upstream: Any, tmp_path: Path
) -> None:
    """The key's bound was read from the body again with orjson, and skipped when that failed: a
    field the core skips undecoded (a number past a double) made another team's model answer with
    its window (400) where a model that does not exist is a 404."""
    async with cost_proxy(_with_finance_only(await start_upstream(), tmp_path)) as proxy, aiohttp.ClientSession() as s:
        status, made = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "research", "models": ["m"]})
        assert status == 201, made
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=made["secret"], max_retries=0) as held:
            said: dict[str, tuple[int, str]] = {}
            for model in ("finance-only", "no-such-model"):
                with pytest.raises(openai.APIStatusError) as e:
                    await held.chat.completions.create(
                        model=model, messages=LONG, max_tokens=5, extra_body={"zz": 10**400}
                    )
                said[model] = (e.value.status_code, str(e.value.body).replace(model, "X"))
    assert said["finance-only"] == said["no-such-model"]
    assert said["finance-only"][0] == 404
