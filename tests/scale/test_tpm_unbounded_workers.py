"""`serve --workers 2` without Redis: requests that name no `max_tokens` are held to a TPM by the
workers together (their buckets in the supervisor's run directory), as in one process."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

from tests.scale.support import Spawn
from tests.test_cost_support import one_deployment
from tests.test_tpm_unbounded import ANSWER_WORDS, PROMPT, TPM


async def test_workers_hold_requests_without_max_tokens_to_tpm(spawn: Spawn, start_upstream: Any) -> None:
    up = await start_upstream(reply_words=ANSWER_WORDS, latency_ms=400)
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": TPM}}}, ledger={"backend": "memory"})
    inst = await spawn(cfg, "--workers", "2")

    async def ask() -> int | openai.RateLimitError:
        # A client (a connection) of its own per request, so the kernel spreads them over the workers.
        async with openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0) as c:
            try:
                done = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}])
            except openai.RateLimitError as e:
                return e
            assert done.usage is not None
            return done.usage.total_tokens

    got = await asyncio.gather(*(ask() for _ in range(10)))
    served = [n for n in got if isinstance(n, int)]
    refused = [e for e in got if isinstance(e, openai.RateLimitError)]
    assert len(served) == 1 and len(refused) == 9, got
    assert all(e.code == "rate_limit_exceeded" and "tokens per minute on model 'm'" in e.message for e in refused)
    assert sum(served) <= TPM


async def test_workers_give_back_a_failed_requests_output_hold(spawn: Spawn, start_upstream: Any) -> None:
    """Under `--workers`, as in one process: an upstream error without usage keeps the request's
    prompt counted and gives back the output it held; the next requests reach the upstream (its
    502), where they got the proxy's 429 for a minute."""
    up = await start_upstream(fail_status=500)
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": TPM}}}, ledger={"backend": "memory"})
    inst = await spawn(cfg, "--workers", "2")
    statuses = []
    for kw in ({}, {}, {"max_tokens": 1}, {}):
        async with openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x", max_retries=0) as c:
            try:
                await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **kw)
            except openai.APIStatusError as e:
                statuses.append(e.status_code)
    assert statuses == [502] * 4
