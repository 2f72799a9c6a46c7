"""Other provider-side state a Responses request names by id, beside an `item_reference`: a
reasoning item sent back without its `encrypted_content` is only its id (the provider reads
the reasoning from its store: OpenAI answers "Item with id 'rs_…' not found" when it is not
stored), and a code interpreter's `container` named by id holds the files of whoever made it
(Anthropic's code execution `container`, passed through to an Anthropic deployment, too).
Both were passed through: a tenant holding another's reasoning item id put that tenant's
stored reasoning into its own prompt (the mock, as the provider, reads it into the answer), and
one holding a container id ran code among another tenant's files. With tenants (virtual keys)
the reasoning item is refused before any upstream call, and a container is its tenant's:
named by another tenant (or never given to anyone through edgeroute) it is the provider's own
404 for an unknown container, before any call; named again by its own tenant, in a JSON or a
streamed conversation, it is served (`test_containers_*`). A reasoning item with its encrypted
content, and a new container, are served; a keyless sidecar, one tenant, keeps them all."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.governance_support import store_statements
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
            assert len(up.options.requests) == asked  # it never reached the provider
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


async def _responses_container(client: openai.AsyncOpenAI, stream: bool, container: Any) -> str:
    """The container a code interpreter ran in, for a Responses request (streamed or not)."""
    tools: Any = [{"type": "code_interpreter", "container": container}]
    if not stream:
        said = await client.responses.create(model="m", input="run it", tools=tools)
        calls = [item for item in said.output if item.type == "code_interpreter_call"]
    else:
        async with await client.responses.create(model="m", input="run it", tools=tools, stream=True) as events:
            done = [ev async for ev in events if ev.type == "response.completed"]
        calls = [item for item in done[0].response.output if item.type == "code_interpreter_call"]
    assert len(calls) == 1
    return calls[0].container_id  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
async def test_containers_of_a_code_interpreter_are_their_tenants(
    start_upstream: Any, tmp_path: Path, stream: bool
) -> None:
    up = await start_upstream(record=True)
    cfg = _config(up, tmp_path, keys=True)
    cfg["providers"]["a"]["headers"] = {"x-mock-tool-calls": "code_interpreter=1"}  # the mock runs code
    async with cost_proxy(cfg) as proxy:
        async with (
            openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=BOB, max_retries=0) as bob,
            openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice,
        ):
            bobs = await _responses_container(bob, stream, {"type": "auto"})
            # Bob goes on in his container, by its id.
            assert await _responses_container(bob, stream, bobs) == bobs
            asked = len(up.options.requests)
            for named in (bobs, "cntr_never_given"):
                with pytest.raises(openai.NotFoundError) as refused:
                    await _responses_container(alice, stream, named)
                assert refused.value.body == {
                    "message": f"Container with id '{named}' not found.",
                    "type": "not_found_error",
                    "param": "tools[0].container",
                    "code": "container_not_found",
                }
            assert len(up.options.requests) == asked  # Alice's never reached the provider
            assert await _responses_container(alice, stream, {"type": "auto"}) != bobs  # a new one is hers


async def test_a_response_and_its_container_are_bound_in_one_write(start_upstream: Any, tmp_path: Path) -> None:
    """A JSON Response's id and the container its code ran in go to the store in one
    transaction (its statements traced by SQLite), and both are the caller's."""
    up = await start_upstream(record=True)
    cfg = _config(up, tmp_path, keys=True)
    cfg["providers"]["a"]["headers"] = {"x-mock-tool-calls": "code_interpreter=1"}
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=BOB, max_retries=0) as bob:
            with store_statements(proxy.app) as sql:
                bobs = await _responses_container(bob, False, {"type": "auto"})
            bound = [s for s in sql if s.startswith("INSERT INTO gov_response_owners")]
            assert len(bound) == 2 and sum(s == "BEGIN IMMEDIATE" for s in sql) == 1, sql
            assert await _responses_container(bob, False, bobs) == bobs


async def _anthropic_container(client: anthropic.AsyncAnthropic, stream: bool, container: Any) -> str | None:
    """The container a Messages request with the code execution tool ran in (streamed or not)."""
    say: Any = [{"role": "user", "content": "list the files"}]
    extra = {"container": container} if container is not None else {}
    tools: Any = [{"type": "code_execution_20250825", "name": "code_execution"}]
    if not stream:
        said = await client.messages.create(model="m", max_tokens=5, messages=say, tools=tools, extra_body=extra)
    else:
        async with client.messages.stream(
            model="m", max_tokens=5, messages=say, tools=tools, extra_body=extra
        ) as events:
            said = await events.get_final_message()
    got = said.container  # type: ignore[attr-defined]
    return got.id if got is not None else None


@pytest.mark.parametrize("stream", [False, True])
async def test_containers_of_anthropic_code_execution_are_their_tenants(
    start_mock: Any, tmp_path: Path, stream: bool
) -> None:
    """Anthropic's code execution `container` is the same: passed through natively, it ran the
    request in whichever tenant's container it named."""
    up = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": up})
    keys = {"alice": {"token": ALICE, "team": "alice"}, "bob": {"token": BOB, "team": "bob"}}
    cfg |= {"keys": keys, "ledger": {"path": str(tmp_path / "l.db")}}
    async with cost_proxy(cfg) as proxy:
        async with (
            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob,
            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE, max_retries=0) as alice,
        ):
            bobs = await _anthropic_container(bob, stream, None)
            assert bobs is not None
            assert await _anthropic_container(bob, stream, bobs) == bobs
            assert await _anthropic_container(bob, stream, {"id": bobs}) == bobs
            asked = len(up.options.requests)
            for named in (bobs, {"id": bobs}, "container_never_given"):
                with pytest.raises(anthropic.NotFoundError) as refused:
                    await _anthropic_container(alice, stream, named)
                shown = named["id"] if isinstance(named, dict) else named
                assert refused.value.body == {
                    "type": "error",
                    "error": {"type": "not_found_error", "message": f"Container with id '{shown}' not found."},
                }
            assert len(up.options.requests) == asked  # Alice's never reached the provider
            assert await _anthropic_container(alice, stream, None) not in (None, bobs)


async def test_a_keyless_sidecar_names_any_container(start_mock: Any) -> None:
    """One tenant: a container named by id reaches the provider, bound or not."""
    up = await start_mock("anthropic", record=True)
    async with cost_proxy(provider_config({"a": up})) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0) as client:
            assert await _anthropic_container(client, False, "container_made_elsewhere") == "container_made_elsewhere"


async def test_a_container_whose_owner_cannot_be_read_is_never_used(start_mock: Any, tmp_path: Path) -> None:
    """While the bindings cannot be read, naming a container is a 503 (never passed unchecked);
    an answer whose container could not be bound is still given, and its container is then refused."""
    up = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": up})
    cfg |= {"keys": {"bob": {"token": BOB, "team": "bob"}}, "ledger": {"path": str(tmp_path / "l.db")}}

    def ledger(sql: str) -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "l.db", timeout=10)) as conn:
            conn.execute(sql)
            conn.commit()

    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob:
            kept = await _anthropic_container(bob, False, None)
            await asyncio.to_thread(ledger, "ALTER TABLE gov_response_owners RENAME TO owners_away")
            lost = await _anthropic_container(bob, False, None)  # answered, its binding not written
            asked = len(up.options.requests)
            with pytest.raises(anthropic.InternalServerError) as e:
                await _anthropic_container(bob, False, kept)
            assert e.value.status_code == 503 and "could not check a container" in str(e.value.body)
            await asyncio.to_thread(ledger, "ALTER TABLE owners_away RENAME TO gov_response_owners")
            assert await _anthropic_container(bob, False, kept) == kept
            with pytest.raises(anthropic.NotFoundError):
                await _anthropic_container(bob, False, lost)
    assert len(up.options.requests) == asked + 1  # only the container that was bound reached it


async def test_a_container_named_by_an_input_item_or_a_shell_is_its_tenants(
    start_upstream: Any, tmp_path: Path
) -> None:
    """A `code_interpreter_call` item sent back as input names its container (`container_id`),
    and a code interpreter in auto mode goes on in it (as OpenAI's does); a shell tool names one
    as its `environment`. Another tenant's container, named there, is the same 404 as named by a
    code interpreter tool, before any call."""
    up = await start_upstream(record=True)
    cfg = _config(up, tmp_path, keys=True)
    cfg["providers"]["a"]["headers"] = {"x-mock-tool-calls": "code_interpreter=1"}
    auto: Any = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    async with cost_proxy(cfg) as proxy:
        async with (
            openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=BOB, max_retries=0) as bob,
            openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice,
        ):
            bobs = await _responses_container(bob, False, {"type": "auto"})
            sent_back: Any = [
                {"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "code": "ls",
                 "container_id": bobs, "outputs": None},
                {"role": "user", "content": "list the files again"},
            ]  # fmt: skip
            # Bob's own history goes on in his container.
            said = await bob.responses.create(model="m", input=sent_back, tools=auto)
            assert [i.container_id for i in said.output if i.type == "code_interpreter_call"] == [bobs]
            # A shell tool names a container as its environment: Bob's own is his.
            shell: Any = [{"type": "shell", "environment": {"type": "container_reference", "container_id": bobs}}]
            await bob.responses.create(model="m", input="ls", tools=shell)
            asked = len(up.options.requests)
            for said_to, where in [
                ({"input": sent_back, "tools": auto}, "input[0].container_id"),
                ({"input": "ls", "tools": shell}, "tools[0].environment.container_id"),
            ]:
                with pytest.raises(openai.NotFoundError) as refused:
                    await alice.responses.create(model="m", **said_to)
                assert refused.value.body == {
                    "message": f"Container with id '{bobs}' not found.",
                    "type": "not_found_error",
                    "param": where,
                    "code": "container_not_found",
                }
            assert len(up.options.requests) == asked
