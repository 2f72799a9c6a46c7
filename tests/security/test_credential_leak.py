"""Credential leak: an upstream that quotes the credentials it received (several providers
and self-hosted servers do) must never get them relayed to the client, whatever the path:
error bodies (JSON, streams, `/v1/messages`), the `attempts` details, in-stream error
events, metrics, the request record, or the log."""

from __future__ import annotations

import asyncio
import os
import string
from pathlib import Path

import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeroute import redact
from tests.security.conftest import Leaky, leaky_config, raw_exchange
from tests.serve_support import start_serve
from tests.test_serve import wait_ready

SECRET = "sk-live-0123456789abcdefSECRET"
USER = [{"role": "user", "content": "hello"}]


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


async def _openai_error_text(url: str, stream: bool) -> str:
    client = _client(url)
    try:
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                s = await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[call-overload]
                async for _ in s:
                    pass
            else:
                await client.chat.completions.create(model="m", messages=USER)  # type: ignore[call-overload]
        resp = err.value.response
        return resp.text + repr(dict(resp.headers)) + str(err.value)
    finally:
        await client.close()


@pytest.mark.parametrize("status", [400, 404, 422])
@pytest.mark.parametrize("stream", [False, True])
async def test_credential_leak_client_error_bodies(leaky: Leaky, start_proxy, status: int, stream: bool) -> None:
    """400/404/422 answers are relayed to the client: their message is, the key in it is not."""
    leaky.mode = status
    proxy = await start_proxy(leaky_config(leaky))
    text = await _openai_error_text(proxy.url, stream)
    assert leaky.seen and SECRET in leaky.seen[-1]["Authorization"]  # the upstream did get (and quote) it
    assert SECRET not in text and "[REDACTED]" in text
    assert "Incorrect API key provided" in text  # the upstream's message still reaches the client


@pytest.mark.parametrize("mode", [429, 500, 503, "200-error", "stream-error", "text"])
async def test_credential_leak_attempts_details(leaky: Leaky, start_proxy, mode: int | str) -> None:
    """Retryable failures end in a 502/429 whose `attempts` list each upstream's message."""
    leaky.mode = mode
    proxy = await start_proxy(leaky_config(leaky))
    text = await _openai_error_text(proxy.url, stream=mode == "stream-error")
    assert len(leaky.seen) >= 1
    assert SECRET not in text
    if mode not in ("200-error", "text"):  # these two are summarised, not quoted
        assert "[REDACTED]" in text


async def test_credential_leak_midstream_error_event(leaky: Leaky, start_proxy) -> None:
    """An upstream error event after content has flowed is relayed, redacted."""
    leaky.mode = "midstream-error"
    proxy = await start_proxy(leaky_config(leaky))
    client = _client(proxy.url)
    seen = []
    with pytest.raises(openai.APIError) as err:
        s = await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[call-overload]
        async for chunk in s:
            seen.append(chunk)
    await client.close()
    assert seen and SECRET not in str(err.value) and "[REDACTED]" in str(err.value)


@pytest.mark.parametrize("mode", [400, 500, "midstream-error"])
async def test_credential_leak_anthropic_messages(leaky: Leaky, start_proxy, mode: int | str) -> None:
    """`/v1/messages` rewrites errors into Anthropic's format: still redacted."""
    leaky.mode = mode
    proxy = await start_proxy(leaky_config(leaky))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="unused", max_retries=0)
    try:
        if mode == "midstream-error":
            with pytest.raises(anthropic.APIError) as err:
                async with client.messages.stream(model="m", max_tokens=10, messages=USER) as s:  # type: ignore[arg-type]
                    async for _ in s:
                        pass
            assert SECRET not in str(err.value) and "[REDACTED]" in str(err.value)
        else:
            with pytest.raises(anthropic.APIStatusError) as serr:
                await client.messages.create(model="m", max_tokens=10, messages=USER)  # type: ignore[arg-type]
            assert SECRET not in serr.value.response.text
    finally:
        await client.close()


async def test_credential_leak_metrics_labels(leaky: Leaky, start_proxy) -> None:
    """A secret pasted into a config name (here a deployment) is not scraped from /metrics."""
    leaky.mode = "ok"
    cfg = leaky_config(leaky)
    cfg["deployments"] = {f"d-{SECRET}": cfg["deployments"]["d"]}
    cfg["models"]["m"]["deployments"] = [f"d-{SECRET}"]
    proxy = await start_proxy(cfg)
    client = _client(proxy.url)
    await client.chat.completions.create(model="m", messages=USER)  # type: ignore[call-overload]
    await client.close()
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    assert "edgeroute_attempts_total" in text and SECRET not in text


# Secrets as they come: keys of any printable shape, long enough to be a secret.
secrets_st = st.text(
    alphabet=string.ascii_letters + string.digits + "-_.~+/=!@#$%^*()[]{}|:;<>?", min_size=12, max_size=64
)


async def test_credential_leak_property_random_secrets_every_error_path(leaky: Leaky, start_proxy) -> None:
    """Random provider keys, quoted back by the upstream on every error path, never reach the client."""
    samples: list[str] = []

    @settings(max_examples=12, suppress_health_check=list(HealthCheck), deadline=None, derandomize=True)
    @given(secrets_st)
    def collect(s: str) -> None:
        samples.append(s)

    collect()
    modes: list[int | str] = [400, 404, 422, 429, 500, "200-error", "stream-error", "text", 401]
    for i, secret in enumerate(samples):
        proxy = await start_proxy(leaky_config(leaky, api_key=secret))
        leaky.mode = modes[i % len(modes)]
        text = await _openai_error_text(proxy.url, stream=leaky.mode == "stream-error")
        assert secret not in text, (leaky.mode, secret, text)
        assert leaky.seen[-1]["Authorization"] == f"Bearer {secret}"


def test_redaction_of_credential_shapes() -> None:
    """Credentials edgeroute does not hold (a client's, another service's) are redacted by shape."""
    cases = {
        "key sk-ant-api03-AbCdEf0123456789xyz was refused": "sk-ant-api03",
        "Authorization: Bearer abc.def-ghi_jkl": "abc.def-ghi_jkl",
        "id AKIAIOSFODNN7EXAMPLE": "AKIAIOSFODNN7EXAMPLE",
        "id ASIAIOSFODNN7EXAMPLE": "ASIAIOSFODNN7EXAMPLE",
        '{"api-key": "0123456789abcdef"}': "0123456789abcdef",
        "x-api-key: opaque-token-value": "opaque-token-value",
        "api_key=hunter2hunter2&x=1": "hunter2hunter2",
        "GET https://generativelanguage.googleapis.com/v1beta/models/g?key=AIzaSyD-0123456789": "AIzaSyD",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJl ok": "eyJzdWIiOiIxMjM0In0",
        "cannot connect to postgresql://edge:pa55w0rd@db:5432/spend": "pa55w0rd",
        "redis://:r3dis-pass@127.0.0.1:6379/0 down": "r3dis-pass",
        "AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws creds: wJalrXUtnFEMI0K7MDENG0bPxRfiCYEXAMPLEKEY, use": "wJalrXUtnFEMI0K7MDENG0bPxRfiCYEXAMPLEKEY",
    }
    for text, secret in cases.items():
        out = redact.text(text)
        assert secret not in out and "[REDACTED]" in out, (text, out)
    # Ordinary error texts are left alone.
    for ok in (
        "The model `gpt-4o` does not exist",
        "max_tokens is too large: 99999",
        "tried: d-a, d-b",
        "the AWS region eu-west-1 is not enabled for this model",  # AWS, but no 40-character run
        "commit 0123456789abcdef0123456789abcdef01234567 built it",  # 40 characters, nothing about AWS
    ):
        assert redact.text(ok) == ok


async def test_credential_leak_in_the_log_for_refused_credentials(leaky: Leaky, tmp_path: Path) -> None:
    """`edgeroute serve`: a 401/403 from the upstream is logged for the operator, without the key;
    a malformed request's header line (with the client's token) is neither answered nor logged."""
    leaky.mode = 401
    cfg = leaky_config(leaky, api_key="env:LEAKY_KEY")
    serving = await start_serve(
        tmp_path / "c.yaml", cfg, stdout=asyncio.subprocess.PIPE, env={**os.environ, "LEAKY_KEY": SECRET}
    )
    proc, url, port = serving.proc, serving.url, serving.port
    try:
        await wait_ready(url)
        text = await _openai_error_text(url, stream=False)
        assert SECRET not in text
        client_token = "sk-client-9876543210zyxwvutCLIENT"
        answer = await raw_exchange(
            port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {client_token}".encode()
            + b"\x00\r\nContent-Length: 2\r\n\r\n{}",
        )
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request") and b'"error"' in answer
        assert client_token.encode() not in answer
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    log = err.decode()
    assert "refused our credentials" in log  # the operator is told
    assert SECRET not in log and client_token not in log
    assert "Traceback" not in log


def test_credential_leak_a_secret_that_is_also_a_word_is_redacted_where_it_stands_alone() -> None:
    """A password that is an ordinary word (a test database's "edgeroute") is still replaced
    wherever it appears as itself, but not inside longer names, which would make every later
    error message unreadable ("x-[REDACTED]-tags")."""
    redact.register("wordlike")
    assert redact.text("password wordlike was rejected") == f"password {redact.MARKER} was rejected"
    assert redact.text("postgresql://app:wordlike@db/x") == f"postgresql://app:{redact.MARKER}@db/x"
    assert redact.text('{"key": "wordlike"}') == f'{{"key": "{redact.MARKER}"}}'
    assert redact.text("header x-wordlike-tags is not valid") == "header x-wordlike-tags is not valid"
