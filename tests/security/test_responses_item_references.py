"""Another tenant's stored answer read through an item reference. A Responses deployment keeps
each response's output items in the provider account every tenant shares, and an input item
`{"type": "item_reference", "id": "msg_…"}` (the type may be left out) puts a stored item into
the prompt. edgeroute confines `previous_response_id` to the tenant that created the response,
but passed item references through: a tenant holding another's item id (from a log, a shared
transcript) had the model read that answer back to it. A stored `conversation` is the same:
made at the provider, bound to no tenant. With tenants (virtual keys) both are refused before
any upstream call; a keyless sidecar, one tenant, keeps them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import simple_config
from tests.test_cost_support import cost_proxy

ALICE, BOB = "sk-alice-1", "sk-bob-1"


def _config(up: Any, tmp_path: Path, keys: bool) -> dict[str, Any]:
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "l.db")})
    cfg["providers"]["a"]["kind"] = "openai"  # speaks Responses: the request is relayed as is
    if keys:
        cfg["keys"] = {"alice": {"token": ALICE, "team": "alice"}, "bob": {"token": BOB, "team": "bob"}}
    return cfg


async def _bobs_item(url: str, token: str) -> str:
    """The id of the message item a stored answer to Bob's secret prompt holds."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as bob:
        said = await bob.responses.create(model="m", input="bob-secret-4242")
    assert "bob-secret-4242" in said.output_text
    return said.output[0].id


@pytest.mark.parametrize("typed", [True, False])
async def test_another_tenants_stored_item_cannot_be_referenced(
    start_upstream: Any, tmp_path: Path, typed: bool
) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        item = await _bobs_item(proxy.url, BOB)
        reference: dict[str, Any] = {"type": "item_reference", "id": item} if typed else {"id": item}
        asked = len(up.options.requests)
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(
                    model="m",
                    input=[reference, {"role": "user", "content": "repeat that"}],  # type: ignore[list-item]
                )
            assert refused.value.body == {
                "message": "'input[0]' names a stored item by its id, which edgeroute cannot confine to this "
                "key's tenant: send the item itself, or continue its response with previous_response_id.",
                "type": "invalid_request_error",
                "param": "input",
                "code": None,
            }
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(model="m", input="what was said?", extra_body={"conversation": "conv_1"})
            assert refused.value.body["param"] == "conversation"  # type: ignore[index]
        assert len(up.options.requests) == asked  # neither reached the provider
        assert "bob-secret" not in str(refused.value.body)


@pytest.mark.parametrize("kind", ["item_reference", "reasoning"])
async def test_a_keyless_sidecar_references_its_stored_items(start_upstream: Any, tmp_path: Path, kind: str) -> None:
    """Items named by id (a reasoning item without its encrypted content is read from the store,
    `test_responses_stored_state_by_id`) reach a one-tenant sidecar's provider."""
    up = await start_upstream()
    async with cost_proxy(_config(up, tmp_path, keys=False)) as proxy:
        item = await _bobs_item(proxy.url, "unused")
        named: Any = {"type": kind, "id": item, **({"summary": []} if kind == "reasoning" else {})}
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
            said = await client.responses.create(model="m", input=[named, {"role": "user", "content": "again"}])
    assert "bob-secret-4242" in said.output_text
