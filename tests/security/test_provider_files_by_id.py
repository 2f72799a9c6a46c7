"""Files and vector stores kept at the provider, named by id. The provider account behind a
deployment is every tenant's, and edgeroute relays no upload, so a file id in a request was
never given to its tenant through edgeroute: a tenant holding another's (from a log, a shared
transcript) had the model read that file. With tenants (virtual keys) a request naming one is a
400 saying where, before any call; `server.provider_files: shared` (the account's files are for
everyone) and a keyless sidecar pass it. An application's own `file_id` (a tool's schema, a
tool call's arguments, metadata) is not a provider's and passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock
from tests.security.test_responses_item_references import ALICE, _config
from tests.test_cost_support import cost_proxy

__all__ = ["start_mock"]

PDF = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}}


def _chat(part: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "summarise"}]}]}


CHAT_NAMED = [
    (_chat({"type": "file", "file": {"file_id": "file-bobs"}}), "messages[0].content[0].file.file_id"),
]
RESPONSES_NAMED = [
    (
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-bobs"}]}]},
        "input[0].content[0].file_id",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-bobs", "detail": "auto"}]}]},
        "input[0].content[0].file_id",
    ),
    (
        {"input": "find it", "tools": [{"type": "file_search", "vector_store_ids": ["vs_bobs"]}]},
        "tools[0].vector_store_ids",
    ),
    (
        {
            "input": "run",
            "tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-bobs"]}}],
        },
        "tools[0].container.file_ids",
    ),
    (
        {
            "input": "summarise",
            "prompt": {"id": "pmpt_1", "variables": {"report": {"type": "input_file", "file_id": "file-bobs"}}},
        },
        "prompt.variables.report.file_id",
    ),
]


def _refused(body: Any, where: str) -> None:
    assert body == {
        "message": f"'{where}' names a file or vector store kept at the provider, which edgeroute cannot confine "
        "to this key's tenant: send the file's content instead (file_data, base64), or ask the operator to allow "
        "provider files (server.provider_files: shared).",
        "type": "invalid_request_error",
        "param": where,
        "code": "provider_file_refused",
    }


async def test_a_provider_file_named_by_id_is_refused_with_tenants(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as alice:
            for extra, where in CHAT_NAMED:
                with pytest.raises(openai.BadRequestError) as refused:
                    await alice.chat.completions.create(model="m", extra_body=extra, messages=[])
                _refused(refused.value.body, where)
            for extra, where in RESPONSES_NAMED:
                with pytest.raises(openai.BadRequestError) as refused:
                    await alice.responses.create(model="m", extra_body=extra)
                _refused(refused.value.body, where)
            assert up.options.requests == []  # none reached the provider
            # A file sent whole, and an application's own `file_id`s, are served.
            await alice.chat.completions.create(model="m", messages=_chat(PDF)["messages"])
            lookup = {"type": "object", "properties": {"file_id": {"type": "string"}}}
            await alice.chat.completions.create(
                model="m",
                messages=[
                    {"role": "user", "content": "open my file"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "open", "arguments": '{"file_id": "f1"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "opened"},
                ],
                tools=[{"type": "function", "function": {"name": "open", "parameters": lookup}}],
                metadata={"file_id": "f1"},
            )
    assert len(up.options.requests) == 2


async def test_an_anthropic_tool_call_naming_a_file_id_is_the_applications(start_mock: Any, tmp_path: Path) -> None:
    """A `tool_use` block's input is what the model asked the application for: not a provider's
    file. A file of Anthropic's Files API (a `container_upload`, a document's or an image's
    source) is refused."""
    up = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": up})
    cfg |= {"keys": {"alice": {"token": ALICE, "team": "alice"}}, "ledger": {"path": str(tmp_path / "l.db")}}
    tool: Any = {"name": "open", "input_schema": {"type": "object", "properties": {"file_id": {"type": "string"}}}}
    said: Any = [
        {"role": "user", "content": "open my file"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "open", "input": {"file_id": "f1"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "opened"}]},
    ]
    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE, max_retries=0) as alice:
            await alice.messages.create(model="m", max_tokens=5, messages=said, tools=[tool])
            files_api = {"anthropic-beta": "files-api-2025-04-14"}  # passed through to Anthropic as sent
            for block, where in [
                ({"type": "container_upload", "file_id": "file_bobs"}, "file_id"),
                ({"type": "document", "source": {"type": "file", "file_id": "file_bobs"}}, "source.file_id"),
                ({"type": "image", "source": {"type": "file", "file_id": "file_bobs"}}, "source.file_id"),
            ]:
                upload: Any = [{"role": "user", "content": [block, {"type": "text", "text": "read it"}]}]
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await alice.messages.create(model="m", max_tokens=5, messages=upload, extra_headers=files_api)
                assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
                    f"'messages[0].content[0].{where}' names a file or vector store kept at the provider"
                )
    assert len(up.options.requests) == 1


async def test_an_anthropic_containers_custom_skill_is_refused(start_mock: Any, tmp_path: Path) -> None:
    """A custom skill (`container.skills`, `{"type": "custom", "skill_id": ...}`) is code and files
    uploaded to the account, named by id, as a file is: refused with tenants. Anthropic's own
    skills (`{"type": "anthropic", "skill_id": "xlsx"}`) are the provider's, and pass."""
    up = await start_mock("anthropic", record=True)
    cfg = provider_config({"a": up})
    cfg |= {"keys": {"alice": {"token": ALICE, "team": "alice"}}, "ledger": {"path": str(tmp_path / "l.db")}}
    say: Any = [{"role": "user", "content": "make the report"}]
    tools: Any = [{"type": "code_execution_20250825", "name": "code_execution"}]
    theirs = {"type": "anthropic", "skill_id": "xlsx", "version": "latest"}
    async with cost_proxy(cfg) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE, max_retries=0) as alice:
            bobs = {"type": "custom", "skill_id": "skill_01bobs", "version": "latest"}
            with pytest.raises(anthropic.BadRequestError) as refused:
                await alice.messages.create(
                    model="m",
                    max_tokens=5,
                    messages=say,
                    tools=tools,
                    extra_body={"container": {"skills": [theirs, bobs]}},
                )
            assert refused.value.body["error"] == {  # type: ignore[index]
                "type": "invalid_request_error",
                "message": "'container.skills[1].skill_id' names a custom skill kept at the provider, which edgeroute "
                "cannot confine to this key's tenant: use Anthropic's own skills, or ask the operator to allow "
                "provider files (server.provider_files: shared).",
            }
            assert up.options.requests == []
            await alice.messages.create(
                model="m", max_tokens=5, messages=say, tools=tools, extra_body={"container": {"skills": [theirs]}}
            )
    assert len(up.options.requests) == 1


@pytest.mark.parametrize("setting", ["shared", "keyless"])
async def test_provider_files_pass_when_shared_or_without_tenants(
    start_upstream: Any, tmp_path: Path, setting: str
) -> None:
    up = await start_upstream(record=True)
    cfg = _config(up, tmp_path, keys=setting == "shared")
    if setting == "shared":
        cfg.setdefault("server", {})["provider_files"] = "shared"
    async with cost_proxy(cfg) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ALICE, max_retries=0) as client:
            for extra, _ in RESPONSES_NAMED:
                await client.responses.create(model="m", extra_body=extra)
    assert len(up.options.requests) == len(RESPONSES_NAMED)


async def test_a_file_id_spelt_with_escapes_is_refused(start_upstream: Any, tmp_path: Path) -> None:
    """JSON lets a key's name be spelt with `\\u` escapes, which a search of the body's bytes for
    `file_id` does not find: such a body is read as JSON before it passes."""
    up = await start_upstream(record=True)
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "file", '
        b'"file": {"file\\u005fid": "file-bobs"}}, {"type": "text", "text": "summarise"}]}]}'
    )
    async with cost_proxy(_config(up, tmp_path, keys=True)) as proxy:
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
            async with http.post(proxy.url + "/v1/chat/completions", data=body, headers=auth) as resp:
                assert resp.status == 400
                _refused((await resp.json())["error"], "messages[0].content[0].file.file_id")
    assert up.options.requests == []
