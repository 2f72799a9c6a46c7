"""`/v1/embeddings` at Bedrock (Titan and Cohere over InvokeModel) through the official openai
SDK, against a mock that boto3's own InvokeModel client accepts, with SigV4 checked."""

from __future__ import annotations

import asyncio
from typing import Any

import botocore.config
import botocore.exceptions
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.mock.openai_endpoints import vector
from tests.conftest import routes_upstream
from tests.providers_fixtures import BEDROCK_OPTIONS, MockUpstream, start_mock
from tests.test_providers_bedrock import _boto

__all__ = ["start_mock"]

TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-multilingual-v3"


async def test_mock_is_honest_for_boto3_invoke_model(start_mock) -> None:
    up = await start_mock("bedrock")

    def calls() -> None:
        client = _boto(up.root)
        r = client.invoke_model(modelId=TITAN, body=orjson.dumps({"inputText": "hello there", "dimensions": 256}))
        assert r["contentType"] == "application/json"
        assert r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-bedrock-input-token-count"] == "2"
        out = orjson.loads(r["body"].read())
        assert out["inputTextTokenCount"] == 2 and out["embedding"] == vector("hello there", 8)
        r = client.invoke_model(
            modelId=f"us.{COHERE}", body=orjson.dumps({"texts": ["a", "b c"], "input_type": "search_query"})
        )
        out = orjson.loads(r["body"].read())
        assert out["response_type"] == "embeddings_floats" and len(out["embeddings"]) == 2
        with pytest.raises(botocore.exceptions.ClientError) as e:
            client.invoke_model(modelId=TITAN, body=orjson.dumps({"inputText": "x", "dimensions": 300}))
        assert e.value.response["Error"]["Code"] == "ValidationException"
        with pytest.raises(botocore.exceptions.ClientError) as e:
            client.invoke_model(modelId=COHERE, body=orjson.dumps({"texts": ["a"]}))  # input_type is required
        assert e.value.response["Error"]["Code"] == "ValidationException"
        with pytest.raises(botocore.exceptions.ClientError) as e:
            _boto(up.root, secret="wrong").invoke_model(modelId=TITAN, body=orjson.dumps({"inputText": "x"}))
        assert e.value.response["Error"]["Code"] == "InvalidSignatureException"

    await asyncio.to_thread(calls)


def _config(up: MockUpstream, models: dict[str, str], **options: Any) -> dict[str, Any]:
    return {
        "providers": {
            "aws": {"kind": "bedrock", "base_url": up.base_url, "options": {**BEDROCK_OPTIONS, **options}},
        },
        "deployments": {
            name: {"provider": "aws", "model": model, "price": {"input_per_mtok": 0.02}}
            for name, model in models.items()
        },
        "models": {"embed": {"deployments": [next(iter(models))]}, **{f"m-{n}": {"deployments": [n]} for n in models}},
    }


async def test_titan_through_the_openai_sdk_signed_counted_and_priced(start_mock, start_proxy) -> None:
    up = await start_mock("bedrock", record=True)
    proxy = await start_proxy(_config(up, {"titan": TITAN}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    raw = await client.embeddings.with_raw_response.create(model="embed", input="one two three", dimensions=512)
    r = raw.parse()  # the SDK asked for base64 (its default) and decoded it
    assert len(r.data) == 1 and r.data[0].embedding == pytest.approx(vector("one two three", 8), abs=1e-6)
    assert r.model == "embed" and r.usage.prompt_tokens == 3 and r.usage.total_tokens == 3
    assert float(raw.headers["x-edgeroute-cost-usd"]) == pytest.approx(3 * 0.02 / 1e6)
    seen = up.options.requests[-1]
    assert seen["method"] == "invoke" and seen["model"] == TITAN
    assert seen["body"] == {"inputText": "one two three", "dimensions": 512}
    assert seen["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    rec = proxy.recorder.records[-1]
    assert (rec.status, rec.deployment, rec.outcome) == (200, "titan", "ok")
    assert rec.usage is not None and rec.usage.prompt_tokens == 3 and not rec.usage.estimated
    assert rec.cost_usd == pytest.approx(3 * 0.02 / 1e6)
    floats = await client.embeddings.create(model="embed", input="x y", encoding_format="float")
    assert floats.data[0].embedding == vector("x y", 8)


async def test_cohere_batch_in_order_with_counted_usage(start_mock, start_proxy) -> None:
    up = await start_mock("bedrock", record=True)
    proxy = await start_proxy(_config(up, {"cohere": f"eu.{COHERE}"}, embedding_input_type="search_query"))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    texts = ["first text", "second", "the third one"]
    r = await client.embeddings.create(model="embed", input=texts)
    assert [d.index for d in r.data] == [0, 1, 2]
    assert [d.embedding for d in r.data] == [pytest.approx(vector(t, 8), abs=1e-6) for t in texts]
    assert r.usage.prompt_tokens > 0  # Cohere reports no count in the body: counted by the proxy
    seen = up.options.requests[-1]["body"]
    assert seen == {"texts": texts, "input_type": "search_query", "truncate": "NONE"}
    rec = proxy.recorder.records[-1]
    assert rec.usage is not None and rec.usage.estimated and rec.cost_usd > 0


@pytest.mark.parametrize(
    ("model", "kwargs", "param", "says"),
    [
        (TITAN, {"input": [[1, 2], [3]]}, "input", "token-array inputs"),
        (TITAN, {"input": "a", "dimensions": 300}, "dimensions", "takes 'dimensions' of 256, 512, 1024 only"),
        ("amazon.titan-embed-text-v1", {"input": "a", "dimensions": 256}, "dimensions", "does not take 'dimensions'"),
        (COHERE, {"input": [[1, 2, 3]]}, "input", "token-array inputs"),
        (COHERE, {"input": ["x"] * 97}, "input", "more than 96 inputs"),
        (COHERE, {"input": "a", "dimensions": 256}, "dimensions", "does not take 'dimensions'"),
        ("meta.llama3-70b-instruct-v1:0", {"input": "a"}, None, "Titan or Cohere embeddings only"),
    ],
)
async def test_what_a_bedrock_model_cannot_take_is_a_400_naming_the_deployment(
    start_mock, start_proxy, model: str, kwargs: dict[str, Any], param: str | None, says: str
) -> None:
    up = await start_mock("bedrock", record=True)
    proxy = await start_proxy(_config(up, {"dep": model}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.embeddings.create(model="embed", **kwargs)
    assert says in e.value.message and "`dep`" in e.value.message
    assert (e.value.body or {}).get("param") == param  # type: ignore[union-attr]
    assert up.options.requests == []  # refused before any call


async def test_a_titan_batch_is_one_call_per_text_answered_and_recorded_as_one(start_mock, start_proxy) -> None:
    up = await start_mock("bedrock", record=True)
    proxy = await start_proxy(_config(up, {"titan": TITAN}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x")
    texts = [f"text number {i}" + " word" * (i % 3) for i in range(20)]
    raw = await client.embeddings.with_raw_response.create(model="embed", input=texts, dimensions=256)
    r = raw.parse()
    assert [d.embedding for d in r.data] == [pytest.approx(vector(t, 8), abs=1e-6) for t in texts]
    tokens = sum(len(t.split()) for t in texts)  # Titan's own counts, summed
    assert r.usage.prompt_tokens == tokens and raw.headers["x-edgeroute-attempts"] == "1"
    assert sorted(q["body"]["inputText"] for q in up.options.requests) == sorted(texts)
    assert all(q["body"]["dimensions"] == 256 for q in up.options.requests)
    rec = proxy.recorder.records[-1]
    assert [(a.deployment, a.outcome) for a in rec.attempts] == [("titan", "success")]
    assert rec.usage is not None and rec.usage.prompt_tokens == tokens and not rec.usage.estimated
    assert rec.cost_usd == pytest.approx(tokens * 0.02 / 1e6)


async def test_titan_failure_fails_over_to_cohere(start_mock, start_proxy) -> None:
    bad = await start_mock("bedrock", fail_status=503)
    good = await start_mock("bedrock", record=True)
    cfg = _config(good, {"cohere": COHERE})
    cfg["providers"]["down"] = {"kind": "bedrock", "base_url": bad.base_url, "options": BEDROCK_OPTIONS}
    cfg["deployments"]["titan"] = {"provider": "down", "model": TITAN, "price": {"input_per_mtok": 0.02}}
    cfg["models"]["embed"] = {"deployments": ["titan"], "fallbacks": ["m-cohere"]}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for texts in (["hello"], ["a batch", "of three", "texts"]):
        raw = await client.embeddings.with_raw_response.create(model="embed", input=texts)
        assert raw.headers["x-edgeroute-deployment"] == "cohere" and len(raw.parse().data) == len(texts)
        rec = proxy.recorder.records[-1]
        assert [(a.deployment, a.outcome) for a in rec.attempts] == [("titan", "server_error"), ("cohere", "success")]


@pytest.mark.parametrize("answer", [{"embedding": []}, {"embeddings": {"int8": [[1]]}}, {"embeddings": [[1, "x"]]}, {}])
async def test_a_careless_upstream_answer_is_a_failure_not_a_200(start_proxy, answer: dict[str, Any]) -> None:
    """An answer without usable vectors is the deployment's fault: an error after the attempts, never a 200."""

    async def invoke(_: web.Request) -> web.Response:
        return web.json_response(answer)

    async with routes_upstream(web.post("/model/{model}/invoke", invoke)) as server:
        up = MockUpstream("bedrock", server, None)
        proxy = await start_proxy(_config(up, {"dep": TITAN}))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            await client.embeddings.create(model="embed", input="ok")
        assert e.value.status_code == 502
        rec = proxy.recorder.records[-1]
        assert rec.attempts and {(a.deployment, a.outcome) for a in rec.attempts} == {("dep", "server_error")}
        assert rec.status == 502


async def test_a_batch_for_titan_with_answers_over_256_kib_is_answered(start_proxy) -> None:
    """Each call of a batch for Titan reads its own answer: one over 256 KiB is read in a worker
    thread, which saw no piece of the batch and judged the answer against every input (502
    "upstream answered a different number of embeddings")."""

    async def invoke(request: web.Request) -> web.Response:
        text = orjson.loads(await request.read())["inputText"]
        return web.json_response({"embedding": [float(len(text))] * 60_000, "inputTextTokenCount": 1})

    async with routes_upstream(web.post("/model/{model}/invoke", invoke)) as server:
        proxy = await start_proxy(_config(MockUpstream("bedrock", server, None), {"dep": TITAN}))
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        r = await client.embeddings.create(model="embed", input=["a", "bb", "ccc"], encoding_format="float")
        await client.close()
    assert [(d.index, len(d.embedding), d.embedding[0]) for d in r.data] == [
        (0, 60_000, 1),
        (1, 60_000, 2),
        (2, 60_000, 3),
    ]
    assert r.usage.prompt_tokens == 3
