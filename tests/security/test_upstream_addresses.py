"""An upstream's own address is nobody's business outside: a self-hosted server (vLLM, an
internal proxy) names the URL it was called at in its errors, and OpenAI's rate-limit
messages name the account's organisation. Whatever path an upstream error takes to the
client (a relayed 4xx, the `attempts` of a failover's 502, an in-stream error event,
`/v1/messages`), the provider's base URL, origin, host and port, and the org/project ids
are replaced; the log keeps them for the operator."""

from __future__ import annotations

import anthropic
import openai
import pytest

from edgeroute import redact
from tests.security.conftest import Leaky, leaky_config
from tests.security.test_credential_leak import _openai_error_text

USER = [{"role": "user", "content": "hello"}]
ORG = "org-AbCdEf0123456789GhIjKlMn"
PROJECT = "proj_ZyXwVu9876543210TsRqPoNm"


def _said(leaky: Leaky) -> tuple[str, str]:
    """What the upstream puts in every error message: its address, and the account's ids."""
    assert leaky.server is not None
    host = f"127.0.0.1:{leaky.server.port}"
    leaky.extra = f" (upstream {host}; called at {leaky.base_url}/chat/completions; organization {ORG}, {PROJECT})"
    return host, leaky.base_url


def _clean(text: str, host: str) -> None:
    assert host not in text and ORG not in text and PROJECT not in text, text
    assert "[REDACTED]" in text


async def _midstream_error(url: str) -> str:
    """The error an SDK raises on an error event after content (it has no response of its own)."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.APIError) as err:
            s = await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[call-overload]
            async for _ in s:
                pass
        return str(err.value)
    finally:
        await client.close()


@pytest.mark.parametrize("mode", [404, 429, 500, "midstream-error", "stream-error"])
async def test_upstream_addresses_never_reach_an_openai_client(leaky: Leaky, start_proxy, mode: int | str) -> None:
    host, _ = _said(leaky)
    leaky.mode = mode
    proxy = await start_proxy(leaky_config(leaky))
    if mode == "midstream-error":
        text = await _midstream_error(proxy.url)
    else:  # an HTTP error status, as test_credential_leak reads it
        text = await _openai_error_text(proxy.url, stream=mode == "stream-error")
    _clean(text, host)
    assert "Incorrect API key provided" in text  # the upstream's message itself still reaches the client


@pytest.mark.parametrize("mode", [404, "midstream-error"])
async def test_upstream_addresses_never_reach_an_anthropic_client(leaky: Leaky, start_proxy, mode: int | str) -> None:
    host, _ = _said(leaky)
    leaky.mode = mode
    proxy = await start_proxy(leaky_config(leaky))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        with pytest.raises(anthropic.APIError) as err:
            if mode == "midstream-error":
                async with client.messages.stream(model="m", max_tokens=10, messages=USER) as s:  # type: ignore[arg-type]
                    async for _ in s:
                        pass
            else:
                await client.messages.create(model="m", max_tokens=10, messages=USER)  # type: ignore[arg-type]
        resp = getattr(err.value, "response", None)
        _clean((resp.text if resp is not None and mode != "midstream-error" else "") + str(err.value), host)
    finally:
        await client.close()


def test_the_log_keeps_what_a_client_is_not_shown() -> None:
    """`outbound` (what leaves for a client) replaces the addresses; `text` (the log's) keeps
    them: an operator must see which upstream failed. Short host names are kept only with their
    port (a bare `vllm` could be any word), and a URL's credentials are never registered whole."""
    redact.register_endpoint("http://vllm:8000/v1")
    redact.register_endpoint("https://user:pw-0123456789@10.20.30.40:9443/openai/v1/")
    said = "vllm:8000 and http://vllm:8000/v1/chat and 10.20.30.40 said no; vllm is a library; 8.8.4.4 is another"
    shown = redact.outbound(said)
    assert "vllm:8000" not in shown and "10.20.30.40 " not in shown and "vllm is a library" in shown
    # Another public address, not this upstream's (an internal one goes: test_internal_addresses).
    assert "8.8.4.4" in shown
    assert redact.text(said) == said
    assert (
        redact.outbound(f"Rate limit reached in organization {ORG}") == "Rate limit reached in organization [REDACTED]"
    )
