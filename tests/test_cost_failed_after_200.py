"""An upstream that answered 200 and then could not be delivered (malformed JSON, an answer
the client cannot read, a stream that ended before any content) took the prompt and sent
an answer: the provider billed them. Such an attempt was priced at $0, in the ledger and in
every budget. It is now priced by what was received, estimated (the usage the body reports
when it has one), and flagged so in the ledger and the request log; a 200 that is the
provider's own error object, without usage, is still $0 (the provider did not bill it)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute import _core
from tests.security.conftest import chat_upstream
from tests.test_cost_abandoned_attempts import _rows
from tests.test_cost_support import cost_proxy

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
PROMPT = [{"role": "user", "content": "tell me about the sea " * 20}]
TEXT = "The sea is wide and deep, and it holds more life than any forest. " * 30
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: bytes) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(body=body, content_type="application/json")  # HTTP 200

    return handle


def _stalled(body: bytes) -> Handler:
    """A 200 whose body stops after `body`, the connection held open."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(body)
        await asyncio.sleep(3)
        return resp

    return handle


def _stream(*events: bytes) -> Handler:
    """A 200 event stream of `events`, then the connection closed (no [DONE])."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in events:
            await resp.write(b"data: " + orjson.dumps(ev) + b"\n\n")
        return resp

    return handle


ROLE = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}  # fmt: skip
CUT = b'{"id":"x","object":"chat.completion","created":1,"model":"x","choices":[{"index":0,"message":{"content":"'
TRUNCATED = CUT + TEXT.encode()  # ends mid-string: not JSON
NULL_CHOICES = {
    "id": "x",
    "choices": [None],
    "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
}
TEXT_NO_MESSAGE = {"id": "x", "choices": [{"index": 0, "text": TEXT, "message": "not an object"}]}
ERROR_200 = {"error": {"message": "The model is overloaded.", "type": "server_error"}}


def _tokens(text: str) -> int:
    return int(_core.Router.count_tokens(text, "o200k_base"))


# (the upstream, whether the client streams, the output tokens expected: None when not
# estimated (the upstream's usage), whether it is billed at all, the client's status)
CASES = {
    "malformed-json": (_json(TRUNCATED), False, len(TRUNCATED) // 4, True, 502),
    "unreadable-choices-with-usage": (_json(orjson.dumps(NULL_CHOICES)), False, None, True, 502),
    "unreadable-message-with-text": (_json(orjson.dumps(TEXT_NO_MESSAGE)), False, _tokens(TEXT), True, 502),
    "stalled-mid-body": (_stalled(TRUNCATED), False, len(TRUNCATED) // 4, True, 504),
    "stream-ended-before-content": (_stream(ROLE), True, 0, True, 502),
    "provider-error-object": (_json(orjson.dumps(ERROR_200)), False, 0, False, 502),
    "stream-error-event": (_stream(ERROR_200), True, 0, False, 502),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_failure_after_a_200_is_priced_by_what_was_received(tmp_path: Path, case: str) -> None:
    handle, stream, output, billed, status = CASES[case]
    up = await chat_upstream(handle)
    db = tmp_path / "l.db"
    cfg = {
        "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1", "timeouts": {"idle": 0.5}}},
        "deployments": {"d": {"provider": "p", "model": "gpt-4o", "price": PRICE}},
        "models": {"m": {"deployments": ["d"], "max_attempts": 1}},
        "ledger": {"path": str(db), "flush_interval": 0.1},
        "budgets": {"limits": [{"name": "all", "scope": "global", "limit_usd": 100.0}]},
    }
    try:
        async with cost_proxy(cfg) as proxy:
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
                with pytest.raises(openai.APIStatusError) as failed:
                    if stream:
                        async for _ in await client.chat.completions.create(model="m", messages=PROMPT, stream=True):
                            pass
                    else:
                        await client.chat.completions.create(model="m", messages=PROMPT)
            async with aiohttp.ClientSession() as s, s.get(proxy.url + "/admin/budgets") as r:
                spent = float((await r.json())["budgets"][0]["spent_usd"])
    finally:
        await up.close()
    assert failed.value.status_code == status
    prompt = _tokens("tell me about the sea " * 20)
    ((cost, p, c, est),) = _rows(db, "SELECT cost_usd, prompt_tokens, completion_tokens, usage_estimated FROM spend")
    ((outcome, a_cost),) = _rows(db, "SELECT outcome, cost_usd FROM spend_attempts")
    ((logged_est, logged_cost),) = _rows(db, "SELECT tokens_estimated, cost_usd FROM requests")
    assert outcome == ("timeout" if status == 504 else "server_error")  # the failure it was, whatever it cost
    if not billed:  # the provider's own error, without usage: it did not bill it
        assert cost == a_cost == logged_cost == spent == 0 and (p, c) == (0, 0)
        return
    if output is None:  # the usage the body reported, as reported
        assert (p, c, est) == (120, 80, 0) and not logged_est
    else:  # the prompt as counted and the output from what arrived, estimated
        assert est == 1 and logged_est == 1
        assert p >= prompt and c == output
    assert cost == pytest.approx((p * 1.0 + c * 2.0) / 1e6) and cost > 0
    assert a_cost == pytest.approx(cost) and logged_cost == pytest.approx(cost)
    assert spent == pytest.approx(cost, abs=1e-8)  # the budget counts what the ledger records
