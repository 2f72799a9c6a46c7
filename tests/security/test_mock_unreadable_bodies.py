"""`edgeroute bench mock --kind anthropic|gemini|azure` answers a body it cannot read as its
provider does: a 400 in the provider's error format. A field of an unexpected type
(`"thinking": 5`, `"messages": [5]`, Gemini's `"generationConfig": 5`, Azure's
`"max_tokens": "5"`) raised in the mock, and aiohttp answered a plain-text 500: to an SDK a
server error it retries, and to a gateway in front a failing deployment, where the provider
names the client's mistake."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import anthropic
import openai
import pytest

from tests.test_operator_walk2 import _stop
from tests.test_operator_walk5 import _mock


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())  # not JSON (aiohttp's text 500): the test fails here too


def test_anthropic_mock_refuses_an_unreadable_body_as_anthropic_does() -> None:
    mock, base_url = _mock("--kind", "anthropic")
    try:
        client = anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)
        for extra in ({"thinking": 5}, {"messages": [5]}):
            with pytest.raises(anthropic.BadRequestError) as refused:
                client.messages.create(
                    model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}], extra_body=extra
                )
            assert refused.value.body["type"] == "error", refused.value.body  # type: ignore[index]
            assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        said = client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert said.content
    finally:
        _stop(mock)


@pytest.mark.parametrize(
    "body",
    [
        {"contents": [5]},
        {"contents": [{"role": "user", "parts": 5}]},
        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": 5},
        {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": "x"}},
    ],
)
def test_gemini_mock_refuses_an_unreadable_body_as_gemini_does(body: dict[str, Any]) -> None:
    mock, base_url = _mock("--kind", "gemini")
    try:
        status, got = _post(f"{base_url}/models/g:generateContent", json.dumps(body).encode(), {"x-goog-api-key": "k"})
    finally:
        _stop(mock)
    assert status == 400, got
    assert got["error"]["code"] == 400 and got["error"]["status"] == "INVALID_ARGUMENT", got


def test_azure_mock_refuses_an_unreadable_body_as_azure_does() -> None:
    mock, base_url = _mock("--kind", "azure")
    try:
        client = openai.AzureOpenAI(azure_endpoint=base_url, api_key="unused", api_version="2024-10-21", max_retries=0)
        for extra in ({"messages": [5]}, {"max_tokens": "5"}):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(
                    model="d", messages=[{"role": "user", "content": "hi"}], extra_body=extra
                )
            assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "BadRequest"
    finally:
        _stop(mock)
