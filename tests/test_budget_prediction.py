"""Chat completions with a Predicted Output (`prediction`) under a budget: the prediction's
tokens are reserved at the output price beside `max_tokens`.

OpenAI bills the predicted tokens an answer does not use (`rejected_prediction_tokens`) as
completion tokens, beyond `max_tokens`. The reservation counted `max_tokens` alone: concurrent
requests with a long prediction and a small `max_tokens` each passed a budget with room for
one, and together spent several times its limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Upstream
from tests.metrics_support import ledger_written
from tests.test_cost_support import budget_spent, cost_proxy

ADMIN = "sk-predict-admin"
APP = "sk-predict-app"
OUT = 10.0  # USD per million output tokens: 1,000 tokens are one cent
PREDICTED = " ".join(["word"] * 300)  # 300 tokens, none of which the mock's answer uses


def _config(up: Upstream, tmp_path: Path) -> dict[str, Any]:
    return {
        "providers": {"p": {"base_url": up.base_url, "api_key": "key-p"}},
        "deployments": {
            "d": {"provider": "p", "model": "gpt-4o", "price": {"input_per_mtok": 0, "output_per_mtok": OUT}}
        },
        "models": {"m": {"deployments": ["d"]}},
        "keys": {"app": {"token": APP, "team": "t"}, "ops": {"token": ADMIN, "role": "admin"}},
        "ledger": {"path": str(tmp_path / "l.db"), "flush_interval": 0.05},
        "budgets": {"limits": [{"name": "b", "scope": "team", "match": "t", "limit_usd": 0.01, "period": "day"}]},
    }


# The prediction as a string, as text parts, and under a key spelt with a JSON escape (which
# the upstream reads as `prediction`: a byte search for the name alone missed it).
SHAPES: dict[str, bytes] = {
    "string": b'"prediction":{"type":"content","content":"' + PREDICTED.encode() + b'"}',
    "parts": b'"prediction":{"type":"content","content":[{"type":"text","text":"' + PREDICTED.encode() + b'"}]}',
    "escaped-key": b'"predict\\u0069on":{"type":"content","content":"' + PREDICTED.encode() + b'"}',
}


async def _post(url: str, member: bytes) -> tuple[int, dict[str, Any]]:
    body = b'{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}],' + member + b"}"
    async with aiohttp.ClientSession() as s:
        hdrs = {"Authorization": f"Bearer {APP}", "Content-Type": "application/json"}
        async with s.post(url + "/v1/chat/completions", data=body, headers=hdrs) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_concurrent_predictions_do_not_overshoot_a_budget(
    start_upstream: Any, tmp_path: Path, shape: str
) -> None:
    up = await start_upstream(latency_ms=300)  # the requests overlap
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        got = await asyncio.gather(*(_post(proxy.url, SHAPES[shape]) for _ in range(8)))
        spent = await budget_spent(proxy.url, ADMIN)
    statuses = sorted(s for s, _ in got)
    # Each answer is billed about 310 output tokens ($0.0031): three fit a cent, not eight.
    assert statuses.count(200) in (2, 3) and set(statuses) == {200, 429}, statuses
    assert spent <= 0.01 + 1e-9, f"${spent} spent against a $0.01 budget"
    refused = next(b for s, b in got if s == 429)["error"]["message"]
    assert "prediction's 300 tokens" in refused, refused


async def test_rejected_prediction_tokens_are_settled(start_upstream: Any, tmp_path: Path) -> None:
    """What settles is the answer's `completion_tokens`, which counts the rejected prediction."""
    up = await start_upstream()
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            prediction={"type": "content", "content": [{"type": "text", "text": PREDICTED}]},
        )
        await client.close()
        answer = raw.parse()
        await ledger_written(proxy.url, 1, ADMIN)
        spent = await budget_spent(proxy.url, ADMIN)
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.rejected_prediction_tokens == 300
    billed = answer.usage.completion_tokens * OUT / 1e6
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(billed)
    assert spent == pytest.approx(billed)


@pytest.mark.parametrize(
    ("prediction", "param", "says"),
    [
        ("some code", "prediction", "Invalid type for 'prediction': expected an object, but got a string"),
        ({"type": "text", "content": "x"}, "prediction.type", "Invalid value: 'text'"),
        ({"content": "x"}, "prediction.type", "Missing required parameter: 'prediction.type'"),
        ({"type": "content"}, "prediction.content", "Missing required parameter: 'prediction.content'"),
        ({"type": "content", "content": 5}, "prediction.content", "expected one of a string or array of objects"),
        ({"type": "content", "content": ["x"]}, "prediction.content[0]", "expected an object, but got a string"),
        (
            {"type": "content", "content": [{"type": "image_url", "text": "x"}]},
            "prediction.content[0].type",
            "Invalid value: 'image_url'",
        ),
        (
            {"type": "content", "content": [{"type": "text", "text": 7}]},
            "prediction.content[0].text",
            "expected a string, but got an integer",
        ),
    ],
    ids=["string", "wrong-type", "no-type", "no-content", "number", "string-part", "image-part", "number-text"],
)
async def test_a_prediction_of_the_wrong_shape_is_a_400(
    start_upstream: Any, tmp_path: Path, prediction: Any, param: str, says: str
) -> None:
    up = await start_upstream(record=True)
    async with cost_proxy(_config(up, tmp_path)) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=APP, max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model="m",
                max_tokens=10,
                messages=[{"role": "user", "content": "hi"}],
                extra_body={"prediction": prediction},
            )
        await client.close()
    error = e.value.body
    assert isinstance(error, dict), error
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert says in error["message"], error
    assert up.options.requests == []  # never sent on
