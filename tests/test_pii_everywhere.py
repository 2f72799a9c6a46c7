"""The PII rule sees every byte a provider will see (issue: PII inside tool calls escaped it).

Official SDKs as clients, a real proxy and mock upstreams: personal data placed only in
an assistant's tool-call arguments, a tool's description or schema, a tool result, or an
Anthropic ``tool_use.input`` / ``system`` block routes the request to the deployment
tagged for it. The core's property test (``rust/edgeroute-core/tests/pii_everywhere.rs``)
covers random positions of random requests; this checks the path a user sees.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.providers_fixtures import provider_config, start_mock

# Personal data of these kinds goes only to deployments tagged privacy:high.
PII_STAYS_PRIVATE = {
    "name": "pii-stays-private",
    "when": {"pii": ["email", "phone", "payment_card", "iban", "national_id"]},
    "then": {"require_tags": ["privacy:high"]},
}

__all__ = ["start_mock"]

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.co.uk"


async def _proxy(start_mock: Any, start_proxy: Any) -> tuple[str, Any, Any]:
    public = await start_mock("openai", record=True)
    private = await start_mock("openai", record=True)
    cfg = provider_config({"pub": public, "priv": private})
    cfg["deployments"]["d-priv"]["tags"] = ["privacy:high"]
    cfg["models"]["m"] = {"deployments": ["d-pub", "d-priv"], "strategy": "weighted"}
    cfg["deployments"]["d-pub"]["weight"] = 1000
    cfg["deployments"]["d-priv"]["weight"] = 1
    cfg["rules"] = [PII_STAYS_PRIVATE]
    proxy = await start_proxy(cfg)
    return proxy.url, public, private


def _call(args: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Pay the invoice."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "pay", "arguments": json.dumps(args)}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]


def _tool(description: str, schema_doc: str = "") -> dict[str, Any]:
    params = {"type": "object", "properties": {"to": {"type": "string", "description": schema_doc}}}
    return {"type": "function", "function": {"name": "pay", "description": description, "parameters": params}}


PLACES: dict[str, dict[str, Any]] = {
    "tool_call_arguments": {"messages": _call({"to": EMAIL, "card": CARD})},
    "escaped_arguments": {"messages": _call({"note": f"paid:\n{CARD}"})},
    "tool_description": {"messages": _call({}), "tools": [_tool(f"mails {EMAIL}")]},
    "tool_parameter_schema": {"messages": _call({}), "tools": [_tool("pays", f"e.g. {CARD}")]},
    "tool_result": {
        "messages": [*_call({})[:2], {"role": "tool", "tool_call_id": "call_1", "content": f"charged {CARD}"}]
    },
    "content_part": {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": EMAIL}]}]
    },
}


@pytest.mark.parametrize("place", sorted(PLACES))
async def test_openai_client_pii_anywhere_goes_to_the_private_deployment(
    start_mock: Any, start_proxy: Any, place: str
) -> None:
    url, public, private = await _proxy(start_mock, start_proxy)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", **PLACES[place])
    assert raw.headers["x-edgeroute-rule"] == "pii-stays-private"
    assert raw.headers["x-edgeroute-deployment"] == "d-priv"
    assert len(private.options.requests) == 1 and not public.options.requests
    # Nothing personal: the heavy-weighted public deployment serves it.
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=_call({"to": "accounts"}))
    assert "x-edgeroute-rule" not in raw.headers
    assert raw.headers["x-edgeroute-deployment"] == "d-pub"


ANTHROPIC_PLACES: dict[str, dict[str, Any]] = {
    "tool_use_input": {
        "messages": [
            {"role": "user", "content": "Pay it."},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "pay", "input": {"card": CARD}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
        ]
    },
    "tool_result_blocks": {
        "messages": [
            {"role": "user", "content": "Pay it."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "pay", "input": {}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": EMAIL}]}],
            },
        ]
    },
    "system_blocks": {
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": f"Customer: {EMAIL}"}],
        "messages": [{"role": "user", "content": "hi"}],
    },
    "tool_input_schema": {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "pay", "description": f"pays {CARD}", "input_schema": {"type": "object"}}],
    },
}


@pytest.mark.parametrize("place", sorted(ANTHROPIC_PLACES))
async def test_anthropic_client_pii_anywhere_goes_to_the_private_deployment(
    start_mock: Any, start_proxy: Any, place: str
) -> None:
    url, public, private = await _proxy(start_mock, start_proxy)
    client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
    raw = await client.messages.with_raw_response.create(model="m", max_tokens=50, **ANTHROPIC_PLACES[place])
    assert raw.headers["x-edgeroute-rule"] == "pii-stays-private"
    assert raw.headers["x-edgeroute-deployment"] == "d-priv"
    assert len(private.options.requests) == 1 and not public.options.requests
