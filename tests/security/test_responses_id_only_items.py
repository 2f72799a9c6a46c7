"""An output item sent back as Responses input with only its id names the item the provider
stored under it: OpenAI's guide edits an image "by image ID" with
`{"type": "image_generation_call", "id": "ig_…"}`, and the model works on that stored image.
edgeroute refused an `item_reference` and a reasoning item without its encrypted content, but
passed every other type carrying only its id (an image generation call, a web or file search,
a code interpreter or computer call, an MCP tool list): a tenant holding another's item id
put that tenant's stored output into its own conversation. With tenants (virtual keys) an
input item that is only its id (and its type and status), or an image generation call without
its image, is refused with a 400 before any upstream call, as an item reference is; an item
carried whole is served, and a keyless sidecar, one tenant, keeps them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.security.test_responses_item_references import ALICE, _config
from tests.test_cost_support import cost_proxy

ID_ONLY: list[dict[str, Any]] = [
    {"type": "image_generation_call", "id": "ig_123abc"},
    {"type": "image_generation_call", "id": "ig_123abc", "status": "completed", "result": None},
    {"type": "web_search_call", "id": "ws_123"},
    {"type": "file_search_call", "id": "fs_123", "status": "completed"},
    {"type": "code_interpreter_call", "id": "ci_123"},
    {"type": "computer_call", "id": "cu_123"},
    {"type": "mcp_list_tools", "id": "mcpl_123"},
    {"type": "message", "id": "msg_123"},
    {"type": "message", "role": "assistant", "id": "msg_123"},
    {"type": "ITEM_REFERENCE", "id": "msg_123"},
]


@pytest.mark.parametrize("item", ID_ONLY, ids=[f"{i['type']}-{'-'.join(sorted(i))}" for i in ID_ONLY])
async def test_an_item_named_by_its_id_alone_is_refused(
    item: dict[str, Any], start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(
                    model="m",
                    input=[item, {"role": "user", "content": "make the sky pink"}],  # type: ignore[list-item]
                )
    body: Any = refused.value.body
    assert (body["type"], body["param"]) == ("invalid_request_error", "input")
    assert body["message"].startswith("'input[0]' names a stored item by its id, which edgeroute cannot confine")
    assert up.options.requests == []  # it never reached the provider


WHOLE = {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "aGVsbG8="}


@pytest.mark.parametrize("keys", [True, False], ids=["whole-item", "keyless"])
async def test_items_carried_whole_and_a_keyless_sidecar_are_served(
    keys: bool, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(record=True)
    item = WHOLE if keys else ID_ONLY[0]
    async with cost_proxy(_config(up, tmp_path, keys=keys)) as proxy:
        token = ALICE if keys else "unused"
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0) as client:
            said = await client.responses.create(
                model="m",
                input=[item, {"role": "user", "content": "make the sky pink"}],  # type: ignore[list-item]
            )
    assert said.status == "completed"
    assert up.options.requests[-1]["body"]["input"][0] == item
