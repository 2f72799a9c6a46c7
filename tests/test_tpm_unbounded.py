"""A token-per-minute limit bounds requests that name no `max_tokens`: each takes its prompt
and what the bucket has left, up to the output budgets reserve for it, and settles to what its
answer used. Ten such requests at once no longer pass a TPM by their output, while a lone one
under a TPM below that reservation is served and sequential ones keep their pace."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from edgeroute.config import SharedState, parse
from edgeroute.cost.control import CostControl
from edgeroute.cost.limits import BucketState, LocalLimiter, Take, held_takes
from edgeroute.cost.redis_store import RedisState
from edgeroute.workers.local_state import SqliteState
from tests.test_cost_support import LOADED_HOST_MS, REDIS_URL, cost_proxy, one_deployment, require_redis

PROMPT = " ".join(["hello"] * 100)  # ~100 tokens: a refill of the bucket's prompt takes seconds
ANSWER_WORDS = 1500  # the mock's answer: ~1,500 output tokens, which a TPM of 2,000 nearly holds
TPM = 2000


@pytest.fixture(params=["in_process", "redis"])
def shared(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Where the buckets are counted: this process, or Redis (`shared_state`, a prefix of its own)."""
    if request.param == "in_process":
        return {}
    require_redis()
    return {"shared_state": {"redis_url": REDIS_URL, "prefix": f"edgeroute-test-tpm-{os.urandom(4).hex()}"}}


def _config(base_url: str, shared: dict[str, Any], tpm: int = TPM) -> dict[str, Any]:
    return one_deployment(base_url, rate_limits={"models": {"m": {"tpm": tpm}}}, **shared)


async def _tokens_or_refusal(client: openai.AsyncOpenAI, stream: bool) -> int | openai.RateLimitError:
    """The tokens one request without `max_tokens` was served (its usage), or its 429."""
    messages: Any = [{"role": "user", "content": PROMPT}]
    try:
        if not stream:
            done = await client.chat.completions.create(model="m", messages=messages)
            assert done.usage is not None
            return done.usage.total_tokens
        chunks = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        total = 0
        async for chunk in chunks:
            if chunk.usage is not None:
                total = chunk.usage.total_tokens
        assert total > 0
        return total
    except openai.RateLimitError as e:
        return e


@pytest.fixture
async def client(start_upstream: Any, shared: dict[str, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    up = await start_upstream(reply_words=ANSWER_WORDS, latency_ms=400, chunk_interval=0.0005)
    async with (
        cost_proxy(_config(up.base_url, shared)) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        yield c


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_concurrent_requests_without_max_tokens_are_held_to_tpm(client: openai.AsyncOpenAI, stream: bool) -> None:
    started = time.monotonic()
    got = await asyncio.gather(*(_tokens_or_refusal(client, stream) for _ in range(10)))
    elapsed = time.monotonic() - started
    served = [n for n in got if isinstance(n, int)]
    refused = [e for e in got if isinstance(e, openai.RateLimitError)]
    # The first takes all the bucket holds (its answer may need ~1,600); the others find it drained.
    assert len(served) == 1 and len(refused) == 9, got
    for e in refused:
        assert e.code == "rate_limit_exceeded"
        assert "tokens per minute on model 'm'" in e.message
        assert int(e.response.headers["x-ratelimit-remaining-tokens"]) < 100  # less than its prompt
    # What was served stays within the limit and what refilled meanwhile (a minute's TPM per minute).
    assert served[0] > ANSWER_WORDS  # the answer is whole: no cut to fit the bucket
    assert sum(served) <= TPM + TPM * elapsed / 60


async def test_a_lone_request_under_a_small_tpm_is_served_and_sequential_ones_keep_pace(
    start_upstream: Any, shared: dict[str, Any]
) -> None:
    """Below `budgets.reserve_max_tokens` (4,096), a request without `max_tokens` takes what is
    left instead of being refused as too large; settlement gives back what its answer did not
    use, so the next one finds the bucket as full as the answers left it."""
    up = await start_upstream(reply_words=100)
    async with (
        cost_proxy(_config(up.base_url, shared, tpm=1500)) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        messages: Any = [{"role": "user", "content": "hi"}]
        used, started = 0, time.monotonic()
        for _ in range(5):  # ~110 tokens each: 550 of a TPM of 1,500, one after the other
            raw = await c.chat.completions.with_raw_response.create(model="m", messages=messages)
            answer = raw.parse()
            assert answer.usage is not None
            # It took all that was left, and says so; the next sees the rest given back.
            assert raw.headers["x-ratelimit-remaining-tokens"] == "0"
            used += answer.usage.total_tokens
        assert used < 1500
        # A request naming a bound takes exactly that: what the unbounded ones gave back is there.
        raw = await c.chat.completions.with_raw_response.create(model="m", messages=messages, max_tokens=10)
        left = int(raw.headers["x-ratelimit-remaining-tokens"])
        refilled = 1500 / 60 * (time.monotonic() - started)
        assert 1500 - used - 20 <= left <= 1500 - used - 18 + refilled + 1  # less its prompt (8) and 10


@pytest.fixture(params=["in_process", "workers_file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Each place buckets are counted, with `take` and `adjust_buckets` as admission calls them."""
    if request.param == "in_process":
        lim = LocalLimiter()

        class InProcess:
            async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
                return lim.take(takes)

            async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
                for t, d in zip(takes, deltas, strict=True):
                    lim.adjust(t.name, t.kind, d, limit=t.limit)

        yield InProcess()
        return
    if request.param == "workers_file":
        sqlite = SqliteState(tmp_path / "shared.db")
        yield sqlite
        await sqlite.close()
        return
    require_redis()
    redis = RedisState(
        SharedState(redis_url=REDIS_URL, prefix=f"edgeroute-test-tpm-{os.urandom(4).hex()}", timeout_ms=LOADED_HOST_MS)
    )
    yield redis
    await redis.close()


async def test_each_store_takes_what_is_left_and_says_how_much(store: Any) -> None:
    """A take with `more` takes its amount for sure and whole tokens of `more` as far as the bucket
    holds, and answers what it took, which settlement gives back from (the `SETTLE` script or the
    workers' file alike). An amount that does not fit is refused as before, taking nothing."""
    unbounded = [Take("model:m", "tokens", 1000, 101, 4095)]  # a prompt of 100, one token, up to 4,096
    ok, states = await store.take(unbounded)
    assert ok and 999 <= states[0].taken <= 1000 and states[0].remaining == 0
    assert held_takes(unbounded, states)[0].amount == states[0].taken
    ok, states = await store.take(unbounded)  # drained: not even its prompt and a token fit
    assert not ok and states[0].taken == 0 and 0 < states[0].wait_s < 7
    await store.adjust_buckets([Take("model:m", "tokens", 1000, 1000)], [-600.0])  # it used 400 of 1,000
    ok, states = await store.take(unbounded)
    assert ok and 600 <= states[0].taken <= 602 and states[0].remaining == 0
    ok, states = await store.take([Take("model:m", "tokens", 1000, 1001, 10)])
    assert not ok and states[0].wait_s == math.inf  # more than the limit: too large, whatever `more`


# -- follow-ups (redM2): failed requests, the refill gap, debt kept, honest concurrency, headers --


async def _status(c: openai.AsyncOpenAI, **kw: Any) -> tuple[int, dict[str, str]]:
    """One small request (without a bound unless `kw` names one): its status and headers."""
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], **kw
        )
        return raw.status_code, dict(raw.headers)
    except openai.APIStatusError as e:
        return e.status_code, dict(e.response.headers)


async def test_a_failed_request_without_max_tokens_gives_its_output_hold_back(
    start_upstream: Any, shared: dict[str, Any]
) -> None:
    """An upstream error without usage measured nothing: the request's prompt stays counted, the
    output it held goes back. It kept the whole hold a minute, so after one 502 every request,
    even one asking a single token, got the proxy's 429 while the provider had recovered."""
    up = await start_upstream(fail_status=500)
    async with (
        cost_proxy(_config(up.base_url, shared)) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        assert (await _status(c))[0] == 502
        for kw in ({}, {"max_tokens": 1}, {}):
            status, headers = await _status(c, **kw)
            assert status == 502, (kw, headers.get("x-ratelimit-remaining-tokens"))


async def _admitted_stream(c: openai.AsyncOpenAI) -> int:
    """One tiny stream without a bound: 1 when it was admitted (read to its end), 0 on its 429."""
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    except openai.RateLimitError:
        return 0
    async for _ in raw.parse():
        pass
    return 1


async def test_a_paced_client_without_max_tokens_is_not_admitted_on_every_refilled_token(
    start_upstream: Any, shared: dict[str, Any]
) -> None:
    """Once its bucket is drained, a request naming no bound must find its prompt and a floor of
    output (a quarter of the TPM), not its prompt and one token: a client sending a tiny stream
    every 100 ms was admitted each ten refilled tokens while the first answer was still
    streaming, each writing a long answer (~30x a TPM)."""
    up = await start_upstream(reply_words=ANSWER_WORDS, chunk_interval=0.002)  # ~3 s an answer
    async with (
        cost_proxy(_config(up.base_url, shared)) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        sent, started = [], time.monotonic()
        while time.monotonic() - started < 3:
            sent.append(asyncio.ensure_future(_admitted_stream(c)))
            await asyncio.sleep(0.1)
        served = sum(await asyncio.gather(*sent))
    # The first drains the bucket; the next must wait for ~500 of refill (15 s at 2,000 a minute).
    assert served == 1, served


async def test_a_tpm_hold_of_its_own_lets_honest_requests_run_together(start_upstream: Any) -> None:
    """`rate_limits.unbounded_output_tokens` sets what a request naming no bound holds, apart from
    what budgets reserve (4,096): under a TPM of 2,000 one such request held it all, so the second
    of two honest requests in flight got a 429 whatever either used."""
    up = await start_upstream(reply_words=20, latency_ms=300)
    cfg = one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": TPM}}, "unbounded_output_tokens": 100})
    async with (
        cost_proxy(cfg) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        got = await asyncio.gather(*(_status(c) for _ in range(8)))
    assert [s for s, _ in got] == [200] * 8
    # What is left counts the holds of those in flight (~110 each), not the whole bucket.
    assert all(int(h["x-ratelimit-remaining-tokens"]) > TPM - 8 * 120 for _, h in got)


async def test_a_request_refused_by_its_budget_reports_the_tokens_it_gave_back(
    start_upstream: Any, shared: dict[str, Any]
) -> None:
    """A request refused after its TPM take (here by a budget) gives the take back; its headers
    say so, where they told the bucket drained (0, reset 1m0s) as no later request found it."""
    up = await start_upstream(reply_words=20)
    budget = {"limits": [{"name": "tiny", "scope": "global", "limit_usd": 0.000001}]}
    async with (
        cost_proxy(
            one_deployment(up.base_url, rate_limits={"models": {"m": {"tpm": TPM}}}, budgets=budget, **shared)
        ) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        for _ in range(2):
            status, headers = await _status(c)
            assert status == 402 or status == 429, status
            assert int(headers["x-ratelimit-remaining-tokens"]) >= TPM - 20, headers
            assert headers["x-ratelimit-reset-tokens"] != "1m0s"


async def _kept_s(store: Any, name: str) -> float:
    """How long the store keeps bucket `name` (its tokens) before it expires and comes back full."""
    if isinstance(store, RedisState):
        return float(await store.pipe.call("PTTL", store._rkey(Take(name, "tokens", 1, 0)))) / 1000
    if isinstance(store, SqliteState):
        row = store._db.execute("SELECT expires FROM bucket WHERE key = ?", (f"{name}:tokens",)).fetchone()
        return float(row[0]) - time.time() if row is not None else -1.0
    return math.inf  # in process a bucket is dropped only once full (`forget_full`)


async def test_each_store_keeps_a_bucket_in_debt_until_it_has_refilled(store: Any) -> None:
    """A bucket expired a fixed minute after its last take, debt or not, and settlement wrote no
    debt to a bucket gone meanwhile: on Redis and under --workers an unbounded answer's debt was
    forgotten 61 s later and the bucket came back full. At 60 a minute (1 a second) a debt of
    600 takes ten minutes to refill: the bucket is kept that long, refusing meanwhile."""
    ok, _ = await store.take([Take("model:m", "tokens", 60, 60)])
    assert ok
    await store.adjust_buckets([Take("model:m", "tokens", 60, 60)], [600.0])  # the answer used 660
    assert await _kept_s(store, "model:m") >= 600
    ok, states = await store.take([Take("model:m", "tokens", 60, 1)])
    assert not ok and states[0].wait_s > 590
    assert await _kept_s(store, "model:m") >= 600
    # A settlement whose bucket is gone (expired meanwhile) writes the debt, and keeps it.
    await store.adjust_buckets([Take("model:gone", "tokens", 60, 1)], [120.0])
    assert await _kept_s(store, "model:gone") >= 120
    ok, states = await store.take([Take("model:gone", "tokens", 60, 1)])
    assert not ok and states[0].wait_s > 50


async def test_a_take_whose_client_left_while_the_store_answered_is_given_back(tmp_path: Path) -> None:
    """A client that hangs up while the workers' file (or Redis's TAKE) answers a take cancels
    admission before the ticket holds anything: what the store took stayed taken (up to a whole
    bucket for a request without max_tokens) until it refilled. It goes back once the store answers."""
    cfg = parse(_config("http://127.0.0.1:9/v1", {}), "t.yaml")
    control = CostControl(cfg)
    sqlite = SqliteState(tmp_path / "shared.db")

    class Slow:
        async def take(self, takes: list[Take]) -> tuple[bool, list[BucketState]]:
            got = await sqlite.take(takes)
            await asyncio.sleep(0.2)  # taken; the store's answer on its way
            return got

        async def adjust_buckets(self, takes: list[Take], deltas: list[float]) -> None:
            await sqlite.adjust_buckets(takes, deltas)

    control.shared = Slow()  # type: ignore[assignment]
    unbounded = [Take("model:m", "tokens", TPM, 101, 4095)]
    admission = asyncio.ensure_future(control._take(unbounded))
    await asyncio.sleep(0.05)
    admission.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admission
    await asyncio.sleep(0.4)
    ok, states = await sqlite.take([Take("model:m", "tokens", TPM, TPM - 10)])
    assert ok, states  # what it took is back: the bucket holds (nearly) its whole limit again
    await sqlite.close()


async def test_a_hedge_that_lost_counts_against_tpm_as_the_ledger_counts_it(start_upstream: Any) -> None:
    """Both attempts of a hedged request reached an upstream, which bills both: the model's TPM
    counted the winner's tokens alone (budgets and the ledger count the loser too)."""
    ups = [await start_upstream(reply_words=1000, latency_ms=400, record=True) for _ in range(2)]
    cfg = one_deployment(ups[0].base_url, rate_limits={"models": {"m": {"tpm": 30_000}}})
    cfg["providers"]["b"] = {"base_url": ups[1].base_url, "api_key": "key-b"}
    cfg["deployments"]["d-b"] = {**cfg["deployments"]["d-a"], "provider": "b"}
    cfg["models"]["m"] = {"deployments": ["d-a", "d-b"], "hedge": {"delay_ms": 50, "budget_percent": 100}}
    async with (
        cost_proxy(cfg) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        started = time.monotonic()
        done = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert done.usage is not None and done.usage.total_tokens > 1000
        assert sum(len(u.options.requests) for u in ups) == 2  # it was hedged
        await asyncio.sleep(0.5)  # settled
        status, headers = await _status(c, max_tokens=1)
        refilled = 30_000 / 60 * (time.monotonic() - started)
    assert status == 200
    # Two answers' worth (~2,000), not the winner's alone.
    assert int(headers["x-ratelimit-remaining-tokens"]) <= 30_000 - 2 * done.usage.total_tokens + refilled


async def test_each_answer_of_a_request_without_max_tokens_needs_its_floor(
    start_upstream: Any, shared: dict[str, Any]
) -> None:
    """`n` answers of no bound need `n` floors (as far as the limit holds): with one floor for all,
    a request asking `n: 4` was admitted for the price of one answer and wrote four."""
    up = await start_upstream(reply_words=ANSWER_WORDS, chunk_interval=0.002)  # ~3 s an answer
    async with (
        cost_proxy(_config(up.base_url, shared)) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c,
    ):
        # A bounded stream holds 1,400 of the 2,000 while it runs: ~600 are left.
        running = asyncio.ensure_future(
            c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1400, stream=True
            )
        )
        first = await running
        assert (await _status(c, n=4))[0] == 429  # four answers need four floors of 500: too few left
        assert (await _status(c))[0] == 200  # one answer's floor (500) is there
        async for _ in first:
            pass
