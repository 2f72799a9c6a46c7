"""Each provider's error statuses: the retry class the adapter gives them, and what an OpenAI client sees.

Table-driven, through the real mocks (their real error bodies) and the real proxy.
A retryable class means the proxy tries again (here: the same single deployment,
then gives up with 429/502/504); a client error is returned as the upstream said.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.config import Provider
from edgeroute.outcome import Outcome
from edgeroute.providers import adapter_for
from tests.providers_fixtures import provider_config, start_mock

__all__ = ["start_mock"]

RL, SRV, TMO, CLI, CTX, POL = (
    Outcome.RATE_LIMITED,
    Outcome.SERVER_ERROR,
    Outcome.TIMEOUT,
    Outcome.CLIENT_ERROR,
    Outcome.CONTEXT_WINDOW,
    Outcome.CONTENT_POLICY,
)
AUTH = Outcome.AUTH_ERROR

# (provider kind, upstream status, retry class, status the OpenAI client gets, its OpenAI error type)
TABLE = [
    ("anthropic", 400, CLI, 400, "invalid_request_error"),
    # 401 / 403 refuse edgeroute's provider credentials, not the client's: fail over, then 502.
    ("anthropic", 401, AUTH, 502, "upstream_error"),
    ("anthropic", 403, AUTH, 502, "upstream_error"),
    ("anthropic", 404, CLI, 404, "not_found_error"),
    ("anthropic", 413, CLI, 413, "invalid_request_error"),
    ("anthropic", 429, RL, 429, "rate_limit_error"),
    ("anthropic", 500, SRV, 502, "upstream_error"),
    ("anthropic", 529, RL, 429, "rate_limit_error"),
    ("gemini", 400, CLI, 400, "invalid_request_error"),
    ("gemini", 403, AUTH, 502, "upstream_error"),
    ("gemini", 404, CLI, 404, "not_found_error"),
    ("gemini", 429, RL, 429, "rate_limit_error"),
    ("gemini", 500, SRV, 502, "upstream_error"),
    ("gemini", 503, SRV, 502, "upstream_error"),
    ("gemini", 504, TMO, 504, "timeout_error"),
    ("bedrock", 400, CLI, 400, "invalid_request_error"),
    ("bedrock", 403, AUTH, 502, "upstream_error"),
    ("bedrock", 404, CLI, 404, "not_found_error"),
    ("bedrock", 408, TMO, 504, "timeout_error"),
    ("bedrock", 424, SRV, 502, "upstream_error"),
    ("bedrock", 429, RL, 429, "rate_limit_error"),
    ("bedrock", 500, SRV, 502, "upstream_error"),
    ("bedrock", 503, SRV, 502, "upstream_error"),
    ("azure", 400, CLI, 400, "invalid_request_error"),
    ("azure", 429, RL, 429, "rate_limit_error"),
    ("azure", 500, SRV, 502, "upstream_error"),
]


async def _mock_error(up: Any, status: int) -> tuple[int, bytes]:
    """The mock's own error answer for `status` (the body real clients would see)."""
    paths = {
        "anthropic": "/v1/messages",
        "gemini": "/v1beta/models/x:generateContent",
        "bedrock": "/model/x/converse",
        "azure": "/openai/deployments/x/chat/completions?api-version=1",
    }
    body = {"model": "x", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "x"}]}]}
    body["contents"] = [{"role": "user", "parts": [{"text": "x"}]}]
    headers = {"x-mock-status": str(status), "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as s, s.post(up.root + paths[up.kind], json=body, headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(("kind", "status", "cls", "client_status", "etype"), TABLE)
async def test_error_mapping(
    start_mock, start_proxy, kind: str, status: int, cls: Outcome, client_status: int, etype: str
) -> None:
    up = await start_mock(kind, **({"aws_secret_access_key": None} if kind == "bedrock" else {}))
    got_status, body = await _mock_error(up, status)
    assert got_status == status
    adapter = adapter_for(kind)("p", Provider(kind=kind, base_url="http://127.0.0.1:1"), None)  # type: ignore[arg-type]
    assert adapter.classify(status, body) is cls
    assert cls.retryable is (cls is not CLI)

    cfg = provider_config({"p": up})
    cfg["providers"]["p"]["headers"] = {"x-mock-status": str(status)}
    cfg["models"]["m"]["max_attempts"] = 2
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == client_status
    err = e.value.body
    assert isinstance(err, dict) and err["type"] == etype and err["message"]
    attempts = proxy.recorder.records[-1].attempts
    # A client error is not retried; refused credentials fail over but are not tried again on
    # the same deployment (the same key would be refused again).
    assert len(attempts) == (1 if cls in (CLI, AUTH) else 2)
    assert "key-p" not in str(err) and "dummy-secret" not in str(err)


@pytest.mark.parametrize(
    ("kind", "status", "body", "cls"),
    [
        (
            "anthropic",
            400,
            b'{"type":"error","error":{"type":"invalid_request_error",'
            b'"message":"prompt is too long: 210000 tokens > 200000 maximum"}}',
            CTX,
        ),
        ("anthropic", 529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', RL),
        (
            "gemini",
            400,
            b'{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens'
            b' allowed (1048576).","status":"INVALID_ARGUMENT"}}',
            CTX,
        ),
        ("gemini", 429, b'{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}', RL),
        ("gemini", 500, b'{"error":{"code":500,"message":"Internal error","status":"INTERNAL"}}', SRV),
        ("bedrock", 400, b'{"message":"Input is too long for requested model."}', CTX),
        ("bedrock", 400, b'{"message":"Your request exceeds the service quota for your account."}', RL),
        ("bedrock", 400, b'{"message":"ThrottlingException: Too many tokens"}', RL),
        ("azure", 400, b'{"error":{"code":"content_filter","message":"filtered"}}', POL),
        ("azure", 400, b'{"error":{"code":"context_length_exceeded","message":"too long"}}', CTX),
    ],
)
def test_classify_message_cases(kind: str, status: int, body: bytes, cls: Outcome) -> None:
    adapter = adapter_for(kind)("p", Provider(kind=kind, base_url="http://127.0.0.1:1"), None)  # type: ignore[arg-type]
    assert adapter.classify(status, body) is cls
    assert adapter.error_message(status, body) not in ("", f"upstream answered HTTP {status}")
