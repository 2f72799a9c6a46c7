"""A file kept at the provider named in a tool's own field: the image generation tool's
`input_image_mask: {"file_id": …}` (the mask of an edit) was not read (only `container`
under a tool was), so with `server.provider_files: refused` another tenant's (or any) file id
reached the provider. Every field of a tool is read now, but those holding the application's
own (a function's `parameters`, a custom tool's `format`, an MCP server's `headers`), so
the next built-in tool's field that names a file is refused by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.security.test_provider_files_by_id import _refused
from tests.security.test_responses_item_references import ALICE, _config
from tests.test_cost_support import cost_proxy

NAMED = [
    ({"type": "image_generation", "input_image_mask": {"file_id": "file-bobs"}}, "tools[0].input_image_mask.file_id"),
    ({"type": "a_tool_of_tomorrow", "source_files": [{"file_id": "file-bobs"}]}, "tools[0].source_files[0].file_id"),
]


@pytest.mark.parametrize(("tool", "where"), NAMED, ids=["image-mask", "future-tool"])
async def test_a_file_named_in_a_tools_field_is_refused(
    tool: dict[str, Any], where: str, start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(model="m", input="make the sky pink", tools=[tool])  # type: ignore[list-item]
    _refused(refused.value.body, where)
    assert up.options.requests == []  # it never reached the provider


async def test_a_functions_own_file_id_and_a_mask_sent_whole_are_served(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    schema = {"type": "object", "properties": {"file_id": {"type": "string"}}, "required": ["file_id"]}
    tools: Any = [
        {"type": "function", "name": "open", "parameters": schema},
        {"type": "image_generation", "input_image_mask": {"image_url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            said = await alice.responses.create(model="m", input="open my file", tools=tools)
    assert said.status == "completed" and len(up.options.requests) == 1
