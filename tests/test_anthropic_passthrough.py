"""Anthropic-only fields on `/v1/messages` reach an Anthropic deployment as sent, and its
answer (thinking blocks included) comes back as it was; a deployment that cannot honour
them refuses (400) or, where its provider says `drop`, serves without them and says so."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from edgeroute.mock.anthropic import SIGNATURE, THOUGHT
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

HELLO = [{"role": "user", "content": "Say hello"}]
PRICE = {"input_per_mtok": 3.0, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75, "output_per_mtok": 15.0}
EXTRA: dict[str, Any] = {
    "metadata": {"user_id": "u-1"},
    "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    # Fields this SDK version may not type (or no longer offers): sent as they are.
    "extra_body": {"thinking": {"type": "enabled", "budget_tokens": 1024}, "top_k": 5},
}


async def test_native_fields_headers_and_thinking_pass_through(start_mock, start_proxy) -> None:
    up = await start_mock("anthropic", record=True, cache_write_tokens=2)
    cfg = provider_config({"a": up})
    cfg["deployments"]["d-a"]["price"] = PRICE
    proxy = await start_proxy(cfg)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    raw = await client.messages.with_raw_response.create(
        model="m", max_tokens=2000, messages=HELLO, extra_headers={"anthropic-beta": "extended-cache-ttl-2025-04-11"},
        **EXTRA,
    )  # fmt: skip
    msg = await raw.parse()
    assert msg.content[0].type == "thinking" and msg.content[0].thinking == THOUGHT
    assert msg.content[0].signature == SIGNATURE and msg.content[1].type == "text"
    assert msg.usage.cache_creation_input_tokens == 2
    sent = up.options.requests[-1]
    body, headers = sent["body"], {k.lower(): v for k, v in sent["headers"].items()}
    assert body["model"] == "gpt-4o-mini"  # the deployment's model; everything else as the client sent it
    assert (
        body["thinking"] == EXTRA["extra_body"]["thinking"] and body["top_k"] == 5 and body["system"] == EXTRA["system"]
    )
    assert headers["anthropic-beta"] == "extended-cache-ttl-2025-04-11" and headers["x-api-key"] == "key-a"
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.cache_write_tokens == 2
    want = ((rec.usage.prompt_tokens - 2) * 3.0 + 2 * 3.75 + rec.usage.completion_tokens * 15.0) / 1e6
    assert rec.cost_usd == pytest.approx(want) and float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(want)

    # Streamed: thinking and signature deltas arrive as the upstream sent them.
    async with client.messages.stream(model="m", max_tokens=2000, messages=HELLO, **EXTRA) as s:
        kinds = [ev.type async for ev in s]
        final = await s.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].signature == SIGNATURE
    assert final.content[1].type == "text" and final.content[1].text
    assert "thinking" in kinds and kinds[-1] == "message_stop"
    rec = proxy.recorder.records[-1]
    assert rec.stream and rec.status == 200 and rec.usage is not None and rec.usage.completion_tokens > 0
    assert rec.cost_usd > 0


async def test_a_chat_deployment_refuses_what_it_cannot_honour(start_mock, start_proxy) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"o": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        await client.messages.create(model="m", max_tokens=100, messages=HELLO, **EXTRA)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "`d-o`" in e.value.message and "thinking" in e.value.message and "cache_control" in e.value.message
    assert up.options.requests == []
    # Without Anthropic-only fields the request is served through chat as before.
    ok = await client.messages.create(model="m", max_tokens=100, messages=HELLO)
    assert ok.content[0].type == "text"


async def test_drop_serves_without_them_and_says_so(start_mock, start_proxy) -> None:
    up = await start_mock("openai", record=True)
    proxy = await start_proxy(provider_config({"o": up}, options={"o": {"unsupported_params": "drop"}}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=100, messages=HELLO, **EXTRA)
    assert raw.headers["x-edgeroute-dropped-params"] == "cache_control,thinking,top_k"
    msg = await raw.parse()
    assert msg.content[0].type == "text" and msg.usage.output_tokens > 0
    sent = up.options.requests[-1]["body"]
    assert "thinking" not in sent and "top_k" not in sent and sent["messages"][0]["role"] == "system"
    async with client.messages.stream(model="m", max_tokens=100, messages=HELLO, **EXTRA) as s:
        text = "".join([t async for t in s.text_stream])
        final = await s.get_final_message()
    assert text and final.content[0].text == text and final.stop_reason == "end_turn"
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.completion_tokens > 0 and rec.cost_usd > 0


async def test_failover_from_anthropic_to_a_dropping_deployment(start_mock, start_proxy) -> None:
    down = await start_mock("anthropic", fail_status=529)
    up = await start_mock("openai", record=True)
    cfg = provider_config({"a": down, "o": up}, options={"o": {"unsupported_params": "drop"}})
    cfg["deployments"]["d-a"]["weight"] = 1000
    proxy = await start_proxy(cfg)
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=100, messages=HELLO, **EXTRA)
    assert raw.headers["x-edgeroute-deployment"] == "d-o" and "thinking" in raw.headers["x-edgeroute-dropped-params"]
    assert (await raw.parse()).content[0].type == "text"


# A code execution conversation's second turn: the model's server tool call and its result in
# the history, as Anthropic's SDK sends them back.
CODE_TOOLS: Any = [{"type": "code_execution_20250825", "name": "code_execution"}]
CODE_TURNS: Any = [
    {"role": "user", "content": "How many files are there?"},
    {
        "role": "assistant",
        "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "bash_code_execution", "input": {"command": "ls"}},
            {
                "type": "bash_code_execution_tool_result",
                "tool_use_id": "srvtoolu_1",
                "content": {"type": "bash_code_execution_result", "stdout": "a.txt\n", "stderr": "", "return_code": 0},
            },
            {"type": "text", "text": "One file."},
        ],
    },
    {"role": "user", "content": "Show the first line of a.txt"},
]


async def test_a_conversation_with_server_tool_turns_goes_on_at_anthropic(start_mock, start_proxy) -> None:
    """Its history's server tool blocks were refused ("blocks of type 'server_tool_use' are not
    supported"), on every deployment: a web search or code execution conversation ended at its
    first turn. An Anthropic deployment now gets them as sent; a chat deployment refuses them,
    with `drop` too (a conversation cannot go on without its own turns)."""
    up = await start_mock("anthropic", record=True)
    proxy = await start_proxy(provider_config({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    said = await client.messages.create(model="m", max_tokens=50, messages=CODE_TURNS, tools=CODE_TOOLS)
    assert said.content and up.options.requests[-1]["body"]["messages"] == CODE_TURNS
    async with client.messages.stream(model="m", max_tokens=50, messages=CODE_TURNS, tools=CODE_TOOLS) as s:
        assert (await s.get_final_message()).content
    assert up.options.requests[-1]["body"]["messages"] == CODE_TURNS

    chat = await start_mock("openai", record=True)
    for options in ({}, {"o": {"unsupported_params": "drop"}}):
        proxy = await start_proxy(provider_config({"o": chat}, options=options))
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(model="m", max_tokens=50, messages=CODE_TURNS)
        message = refused.value.body["error"]["message"]  # type: ignore[index]
        assert "bash_code_execution_tool_result" in message and "server_tool_use" in message
    assert chat.options.requests == []


async def test_a_conversation_with_server_tool_turns_is_counted(start_mock, start_proxy) -> None:
    """`count_tokens` refused it too; its server tool turns are counted as their JSON."""
    up = await start_mock("anthropic")
    proxy = await start_proxy(provider_config({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    whole = await client.messages.count_tokens(model="m", messages=CODE_TURNS, tools=CODE_TOOLS)
    plain = [CODE_TURNS[0], {"role": "assistant", "content": "One file."}, CODE_TURNS[2]]
    assert whole.input_tokens > (await client.messages.count_tokens(model="m", messages=plain)).input_tokens + 20
