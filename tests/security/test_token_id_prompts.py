"""Prompts sent as token ids (`/v1/completions`, `/v1/embeddings`) count at admission.

The core decides on a routing body holding the request's text; token ids are no text, so a
prompt of 100,000 ids was admitted as a prompt of none: token limits (TPM) and budgets
reserved its answer only, and a key held to 1,000 tokens a minute sent any number. The
number of ids is exact: it is now the decision's prompt count (with the text's exact count
when a request mixes both), so admission reserves it like any prompt. Odd shapes are the
client's 400 in OpenAI's format, naming the parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.security.conftest import loop_lag
from tests.test_cost_support import cost_proxy, one_deployment


def _client(url: str, key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def _status(call: Any) -> tuple[int, str]:
    try:
        raw = await call
    except openai.APIStatusError as e:
        return e.status_code, e.message
    return 200, raw.headers.get("x-ratelimit-remaining-tokens", "")


IDS = list(range(1000, 2500))  # 1,500 token ids


@pytest.mark.parametrize(
    ("endpoint", "prompt"),
    [
        ("completions", IDS),
        ("completions", [IDS[:750], IDS[750:]]),
        ("embeddings", IDS),
        ("embeddings", [IDS[:750], IDS[750:]]),
        ("embeddings", ["hello there", IDS[:1200]]),  # text and ids in one request: both count
    ],
    ids=["completions-ids", "completions-id-arrays", "embeddings-ids", "embeddings-id-arrays", "embeddings-mixed"],
)
async def test_token_ids_count_against_a_token_limit(start_upstream: Any, endpoint: str, prompt: Any) -> None:
    up = await start_upstream()
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": 1000}}})
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url)
        try:
            if endpoint == "completions":
                big = client.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=5)
                small = client.completions.with_raw_response.create(model="m", prompt=IDS[:100], max_tokens=5)
            else:
                big = client.embeddings.with_raw_response.create(model="m", input=prompt)
                small = client.embeddings.with_raw_response.create(model="m", input=[IDS[:100]])
            status, message = await _status(big)
            assert status == 429 and "Request too large" in message, (status, message)
            status, remaining = await _status(small)  # a prompt within the limit: served, its ids taken
            assert status == 200 and int(remaining) <= 1000 - 100, (status, remaining)
        finally:
            await client.close()


@pytest.mark.parametrize("endpoint", ["completions", "embeddings"])
async def test_token_ids_count_against_a_budget(start_upstream: Any, tmp_path: Path, endpoint: str) -> None:
    """1,500 ids at $1,000 per million prompt tokens are $1.50: over a $1 budget, refused."""
    up = await start_upstream()
    cfg = one_deployment(
        up.base_url,
        keys={"app": {"token": "tok-app-0123456789", "team": "t"}},
        ledger={"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        budgets={"limits": [{"name": "one", "scope": "team", "match": "t", "limit_usd": 1.0, "period": "day"}]},
    )
    cfg["deployments"]["d-a"]["price"] = {"input_per_mtok": 1000.0, "output_per_mtok": 0.0}
    async with cost_proxy(cfg) as proxy:
        client = _client(proxy.url, "tok-app-0123456789")
        try:
            if endpoint == "completions":
                status, message = await _status(
                    client.completions.with_raw_response.create(model="m", prompt=IDS, max_tokens=1)
                )
            else:
                status, message = await _status(client.embeddings.with_raw_response.create(model="m", input=IDS))
            assert status == 429 and "budget" in message.lower(), (status, message)
        finally:
            await client.close()


HOSTILE_PROMPTS: list[Any] = [
    [1, -1],
    [1, 2**32],
    [1, 2**70],
    [[1, 2], [3, "a"]],
    [[1, [2]]],
    [[1, 2], []],
    [True, 1],
    [1.5],
    [[1], "text"],
    {"tokens": [1, 2]},
    [None],
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS, ids=[repr(p)[:24] for p in HOSTILE_PROMPTS])
async def test_odd_token_prompts_are_a_400_naming_the_parameter(start_upstream: Any, prompt: Any) -> None:
    up = await start_upstream()
    async with cost_proxy(one_deployment(up.base_url)) as proxy:
        client = _client(proxy.url)
        try:
            with pytest.raises(openai.BadRequestError) as err:
                await client.completions.create(model="m", prompt=prompt, max_tokens=1)
            assert err.value.param == "prompt" and "token" in err.value.message, err.value.body
            if prompt != [[1], "text"]:  # embeddings take text and token arrays mixed
                with pytest.raises(openai.BadRequestError) as err:
                    await client.embeddings.create(model="m", input=prompt)
                assert err.value.param == "input", err.value.body
        finally:
            await client.close()


async def test_huge_and_deep_token_prompts_are_answered_not_crashed(start_upstream: Any) -> None:
    """A prompt of 1,000,000 ids is counted (a 429 against a limit, not a 500), and 3,000
    nested arrays are a 400 in OpenAI's format."""
    up = await start_upstream()
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": 100_000}}})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        huge = {"model": "m", "prompt": [7] * 1_000_000, "max_tokens": 1}
        async with s.post(proxy.url + "/v1/completions", json=huge) as r:
            body = await r.json()
            assert r.status == 429 and "Request too large" in body["error"]["message"], body
        deep = b'{"model": "m", "prompt": ' + b"[" * 3000 + b"1" + b"]" * 3000 + b"}"
        async with s.post(proxy.url + "/v1/completions", data=deep, headers={"Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 400 and body["error"]["type"] == "invalid_request_error", body


async def test_a_body_of_millions_of_token_ids_leaves_the_loop_free(serve: Any, start_upstream: Any) -> None:
    """Five million ids (10 MB) took the event loop for 1.5 s to parse and check: every other
    client waited. Parsed in a worker thread, the loop wakes on time meanwhile."""
    up = await start_upstream()
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": 100_000}}})
    proxy = await serve(cfg)
    body = b'{"model": "m", "max_tokens": 1, "prompt": [' + b"7," * 4_999_999 + b"7]}"
    async with aiohttp.ClientSession() as s:
        worst = 0.0
        for _ in range(3):
            with loop_lag() as lag:
                async with s.post(
                    proxy.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    got = await r.json()
            assert r.status == 429 and "Request too large" in got["error"]["message"], got
            worst = max(worst, lag.max_s)
    # Parsing the JSON itself holds the GIL (~0.3 s here); checking and counting five million
    # ids on the loop held it 1.5 s. The bound leaves room for a busy machine.
    assert worst < 0.75, f"the event loop stalled {worst:.2f} s"
