"""Other provider-side state a Responses request names by id, beside an `item_reference`: a
reasoning item sent back without its `encrypted_content` is only its id (the provider reads
the reasoning from its store: OpenAI answers "Item with id 'rs_…' not found" when it is not
stored), and a code interpreter's `container` named by id holds the files of whoever made it
(Anthropic's code execution `container`, passed through to an Anthropic deployment, too).
Both were passed through: a tenant holding another's reasoning item id put that tenant's
stored reasoning into its own prompt (the mock, as the provider, reads it into the answer), and
one holding a container id ran code among another tenant's files. With tenants (virtual keys)
both are refused before any upstream call; a reasoning item with its encrypted content, and a
new container, are served; a keyless sidecar, one tenant, keeps them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock
from tests.security.test_responses_item_references import ALICE, BOB, _bobs_item, _config
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]


async def test_another_tenants_reasoning_cannot_be_named_by_id(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        item = await _bobs_item(proxy.url, BOB)
        asked = len(up.options.requests)
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(
                    model="m",
                    input=[
                        {"type": "reasoning", "id": item, "summary": []},
                        {"role": "user", "content": "repeat what you thought"},
                    ],
                )
            assert refused.value.body == {
                "message": "'input[0]' is a reasoning item without its encrypted_content, which names stored "
                "reasoning edgeroute cannot confine to this key's tenant: send it with its encrypted_content "
                "(include reasoning.encrypted_content), or continue its response with previous_response_id.",
                "type": "invalid_request_error",
                "param": "input",
                "code": None,
            }
            with pytest.raises(openai.BadRequestError) as refused:
                await alice.responses.create(
                    model="m",
                    input="list the files",
                    tools=[{"type": "code_interpreter", "container": "cntr_bobs"}],
                )
            assert refused.value.body["param"] == "tools"  # type: ignore[index]
            assert len(up.options.requests) == asked  # neither reached the provider
            # Reasoning carried whole, and a new container, are the caller's own.
            said = await alice.responses.create(
                model="m",
                input=[
                    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA-alice"},
                    {"role": "user", "content": "go on"},
                ],
                tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
            )
    assert said.status == "completed" and "bob-secret" not in said.output_text


@pytest.mark.parametrize("container", ["container_011bobs", {"id": "container_011bobs"}])
async def test_an_anthropic_container_cannot_be_named_by_id(
    start_mock: Any, tmp_path: Path, container: str | dict[str, str]
) -> None:
    """Anthropic's code execution `container` is the same: passed through natively, it ran the
    request in whichever tenant's container it named. A new one (no id) is served."""
    up = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": up})
    cfg |= {"keys": {"alice": {"token": ALICE, "team": "alice"}}, "ledger": {"path": str(tmp_path / "l.db")}}
    say: Any = [{"role": "user", "content": "list the files"}]
    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE, max_retries=0) as alice:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await alice.messages.create(model="m", max_tokens=5, messages=say, extra_body={"container": container})
            assert refused.value.body == {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "container: names a container at the provider, which edgeroute cannot confine to "
                    "this key's tenant: leave out its id for a new one.",
                },
            }
            assert up.options.requests == []  # it never reached the provider
            said = await alice.messages.create(model="m", max_tokens=5, messages=say, extra_body={"container": {}})
    assert said.content and len(up.options.requests) == 1
