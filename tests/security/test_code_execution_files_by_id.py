"""The files Anthropic's code execution writes are their tenant's. An answer names each output
file by id (a `bash_code_execution_output` in its `bash_code_execution_tool_result`), and the
tenant sends it back: its conversation's history, a `container_upload`, a document. With
tenants every such id was refused as a provider file no tenant owns, so an honest tenant could
not go on with its own conversation. Each id an answer (JSON, or a stream after its last event)
names is now bound to its caller: it passes for that tenant; named by another tenant (or spelt
with `\\u` escapes) it is refused before any call as an id no answer gave is, with the same
answer (a different one would tell the holder of an id that some tenant owns it)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from tests.conftest import routes_upstream
from tests.governance_support import store_statements
from tests.providers_fixtures import provider_config, start_mock
from tests.security.test_responses_item_references import ALICE, BOB
from tests.test_cost_support import cost_proxy
from tests.test_cost_tool_calls import _cut

__all__ = ["start_mock"]

TOOLS: Any = [{"type": "code_execution_20250825", "name": "code_execution"}]
ASK: Any = {"role": "user", "content": "Write the report to report.csv"}


async def _run(client: anthropic.AsyncAnthropic, stream: bool) -> Any:
    """A code execution answer that writes a file: its content blocks, as the SDK gives them."""
    if not stream:
        said = await client.messages.create(model="m", max_tokens=20, messages=[ASK], tools=TOOLS)
    else:
        async with client.messages.stream(model="m", max_tokens=20, messages=[ASK], tools=TOOLS) as events:
            said = await events.get_final_message()
    return [b.model_dump(exclude_none=True) for b in said.content]


def _output_file(content: Any) -> str:
    result = next(b for b in content if b["type"] == "bash_code_execution_tool_result")
    file_id: str = result["content"]["content"][0]["file_id"]
    return file_id


def _going_on(content: Any, file_id: str) -> Any:
    """The conversation sent back: its history, and the file as a container upload and a document."""
    upload = {"type": "container_upload", "file_id": file_id}
    doc = {"type": "document", "source": {"type": "file", "file_id": file_id}}
    return [
        ASK,
        {"role": "assistant", "content": content},
        {"role": "user", "content": [upload, doc, {"type": "text", "text": "Read it back"}]},
    ]


def _config(up: Any, tmp_path: Path) -> dict[str, Any]:
    cfg = provider_config({"a": up})
    cfg["providers"]["a"]["headers"] = {"x-mock-output-file": "report.csv"}  # each run writes a file
    keys = {"alice": {"token": ALICE, "team": "alice"}, "bob": {"token": BOB, "team": "bob"}}
    return cfg | {"keys": keys, "ledger": {"path": str(tmp_path / "l.db")}}


@pytest.mark.parametrize("stream", [False, True])
async def test_code_execution_output_files_are_their_tenants(start_mock: Any, tmp_path: Path, stream: bool) -> None:
    up = await start_mock("anthropic", record=True)
    files_api = {"anthropic-beta": "files-api-2025-04-14"}
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        async with (
            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob,
            anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE, max_retries=0) as alice,
        ):
            content = await _run(bob, stream)
            bobs = _output_file(content)
            said = _going_on(content, bobs)
            # Bob goes on with his own file: served, as sent.
            await bob.messages.create(model="m", max_tokens=20, messages=said, tools=TOOLS, extra_headers=files_api)
            assert up.options.requests[-1]["body"]["messages"] == said
            asked = len(up.options.requests)
            # Alice, holding Bob's id: refused before any call, as an id no answer gave.
            for messages in (said, [{"role": "user", "content": said[2]["content"][1:]}]):
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await alice.messages.create(
                        model="m", max_tokens=20, messages=messages, tools=TOOLS, extra_headers=files_api
                    )
                assert refused.value.body["error"]["type"] == "invalid_request_error"
                assert "names a file or vector store kept at the provider" in refused.value.message
            # Spelt with escapes (the key's name and the id): the same.
            escaped = orjson.dumps(
                {
                    "model": "m",
                    "max_tokens": 20,
                    "messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "@"}]}],
                }
            ).replace(b'"file_id":"@"', b'"file\\u005fid":"' + bobs[:-1].encode() + b"\\u%04x" % ord(bobs[-1]) + b'"')
            headers = {"x-api-key": ALICE, "anthropic-version": "2023-06-01", "content-type": "application/json"}
            async with aiohttp.ClientSession() as http:
                async with http.post(proxy.url + "/v1/messages", data=escaped, headers={**headers, **files_api}) as r:
                    assert r.status == 400 and "kept at the provider" in (await r.json())["error"]["message"]
            assert len(up.options.requests) == asked  # none of Alice's reached the provider
            # An id no answer gave is a provider file no tenant owns: refused as before, for Bob too.
            with pytest.raises(anthropic.BadRequestError) as unknown:
                await bob.messages.create(
                    model="m", max_tokens=20, messages=_going_on(content, "file_never_given"), extra_headers=files_api
                )
            assert "names a file or vector store kept at the provider" in unknown.value.message
            # Alice's own run's file is hers.
            hers = _output_file(await _run(alice, stream))
            await alice.messages.create(model="m", max_tokens=20, messages=_going_on(content, hers)[2:], tools=TOOLS)


async def test_an_answer_binds_its_container_and_files_in_one_write(start_mock: Any, tmp_path: Path) -> None:
    """A code execution answer's container and output file are bound in one transaction (the
    store's statements traced by SQLite); an answer without code execution writes no binding."""
    up = await start_mock("anthropic", record=True)
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob:
            with store_statements(proxy.app) as sql:
                said = await bob.messages.create(model="m", max_tokens=20, messages=[ASK], tools=TOOLS)
            assert said.container is not None
            bound = [s for s in sql if s.startswith("INSERT INTO gov_response_owners")]
            assert len(bound) == 2 and sum(s == "BEGIN IMMEDIATE" for s in sql) == 1, sql
            with store_statements(proxy.app) as sql:
                await bob.messages.create(model="m", max_tokens=20, messages=[ASK])
            assert not [s for s in sql if s.startswith("INSERT")], sql


async def test_an_output_file_whose_owner_cannot_be_read_is_never_used(start_mock: Any, tmp_path: Path) -> None:
    """While the bindings cannot be read, naming an output file is a 503 (never passed
    unchecked); an answer whose files could not be bound is still given, and they are then
    refused as files no answer gave."""
    up = await start_mock("anthropic", record=True)

    def ledger(sql: str) -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "l.db", timeout=10)) as conn:
            conn.execute(sql)
            conn.commit()

    async with cost_proxy(_config(up, tmp_path)) as proxy:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob:
            kept = await _run(bob, False)
            await asyncio.to_thread(ledger, "ALTER TABLE gov_response_owners RENAME TO owners_away")
            lost = await _run(bob, False)  # answered, its file's binding not written
            asked = len(up.options.requests)
            with pytest.raises(anthropic.InternalServerError) as e:
                await bob.messages.create(model="m", max_tokens=20, messages=_going_on(kept, _output_file(kept)))
            assert e.value.status_code == 503 and "could not check a file_id" in str(e.value.body)
            await asyncio.to_thread(ledger, "ALTER TABLE owners_away RENAME TO gov_response_owners")
            await bob.messages.create(model="m", max_tokens=20, messages=_going_on(kept, _output_file(kept)))
            with pytest.raises(anthropic.BadRequestError):
                await bob.messages.create(model="m", max_tokens=20, messages=_going_on(lost, _output_file(lost)))
    assert len(up.options.requests) == asked + 1  # only the conversation whose file was bound reached it


async def _written_then_cut(request: web.Request) -> web.StreamResponse:
    """A code execution run whose file is named, then the connection closed before the answer's
    end; a request without `stream` is answered in full (so that one reaching it is seen)."""
    body = await request.json()
    if not body.get("stream"):
        usage = {"input_tokens": 5, "output_tokens": 1}
        said = {"id": "msg_y", "type": "message", "role": "assistant", "model": "x", "stop_reason": "end_turn",
                "stop_sequence": None, "content": [{"type": "text", "text": "read"}], "usage": usage}  # fmt: skip
        return web.json_response(said)
    message = {"id": "msg_x", "type": "message", "role": "assistant", "model": "x", "content": [],
               "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "bash_code_execution", "input": {}}
    output = {"type": "bash_code_execution_output", "file_id": CUT_FILE}
    result = {"type": "bash_code_execution_result", "stdout": "", "stderr": "", "return_code": 0, "content": [output]}
    return await _cut(
        request,
        [
            {"type": "message_start", "message": message},
            {"type": "content_block_start", "index": 0, "content_block": use},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {
                "type": "bash_code_execution_tool_result", "tool_use_id": "srvtoolu_1", "content": result}},
            {"type": "content_block_stop", "index": 1},
        ],
    )  # fmt: skip


CUT_FILE = "file_011CutBeforeItsEnd"


async def test_a_file_named_by_a_stream_cut_before_its_end_is_not_bound(tmp_path: Path) -> None:
    """A stream's files are bound once its last event is read: one cut after naming a file (the
    upstream gone, an error event) bound it all the same, its answer never given whole."""
    async with routes_upstream(web.post("/v1/messages", _written_then_cut)) as server:
        cfg = {
            "providers": {"a": {"kind": "anthropic", "base_url": server.url, "api_key": "key-a"}},
            "deployments": {"d-a": {"provider": "a", "model": "x"}},
            "models": {"m": {"deployments": ["d-a"]}},
        }
        cfg |= {"keys": {"bob": {"token": BOB, "team": "bob"}}, "ledger": {"path": str(tmp_path / "l.db")}}
        async with cost_proxy(cfg) as proxy:
            async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob:
                with pytest.raises(anthropic.APIError):
                    async with bob.messages.stream(model="m", max_tokens=20, messages=[ASK], tools=TOOLS) as s:
                        async for _ in s:
                            pass
                upload: Any = {"type": "container_upload", "file_id": CUT_FILE}
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await bob.messages.create(
                        model="m", max_tokens=20, messages=[{"role": "user", "content": [upload]}], tools=TOOLS
                    )
                assert "names a file or vector store kept at the provider" in refused.value.message


ACCOUNT_FILE = "file_011UploadedByTheAccount"


async def _relays_a_tool_servers_answer(request: web.Request) -> web.StreamResponse:
    """An answer holding an MCP tool's result as the tool's server gave it (the caller chose
    the server: its answer says what it likes), naming a file it never wrote."""
    await request.read()
    result = {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "is_error": False,
              "content": [{"type": "text", "text": "done", "file_id": ACCOUNT_FILE}]}  # fmt: skip
    use = {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "echo", "server_name": "mine", "input": {}}
    usage = {"input_tokens": 5, "output_tokens": 1}
    said = {"id": "msg_z", "type": "message", "role": "assistant", "model": "x", "stop_reason": "end_turn",
            "stop_sequence": None, "content": [use, result], "usage": usage}  # fmt: skip
    return web.json_response(said)


async def test_a_file_id_in_another_tools_result_is_not_bound(tmp_path: Path) -> None:
    """Only code execution's outputs are files an answer gave: any `file_id` in any server
    tool's result was bound, so a tenant whose own MCP server answered with an account file's
    id (uploaded to the Files API by someone else) could then read it."""
    async with routes_upstream(web.post("/v1/messages", _relays_a_tool_servers_answer)) as server:
        cfg = {
            "providers": {"a": {"kind": "anthropic", "base_url": server.url, "api_key": "key-a"}},
            "deployments": {"d-a": {"provider": "a", "model": "x"}},
            "models": {"m": {"deployments": ["d-a"]}},
            "keys": {"bob": {"token": BOB, "team": "bob"}},
            "ledger": {"path": str(tmp_path / "l.db")},
        }
        async with cost_proxy(cfg) as proxy:
            async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=BOB, max_retries=0) as bob:
                mcp: Any = [{"type": "url", "url": "https://mcp.bob.example/sse", "name": "mine"}]
                beta = {"anthropic-beta": "mcp-client-2025-04-04"}
                await bob.messages.create(model="m", max_tokens=20, messages=[ASK], extra_body={"mcp_servers": mcp},
                                          extra_headers=beta)  # fmt: skip
                doc: Any = {"type": "document", "source": {"type": "file", "file_id": ACCOUNT_FILE}}
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await bob.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": [doc]}])
                assert "names a file or vector store kept at the provider" in refused.value.message
