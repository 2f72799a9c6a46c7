"""An embeddings answer whose vectors the client cannot use (a null vector, a string for a
`float` request, indices that do not number the inputs once each) is the upstream's failure:
failed over, and a 502 in OpenAI's format when every deployment answers so, never a 200
(relayed, and cached, the client's SDK placed vectors by those indices or read a string)."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.test_answers_in_200_that_are_not import Hostile, ServeRoutes, Start, _oai, _proxy, _record


def _answer(*items: dict[str, Any]) -> dict[str, Any]:
    data = [{"object": "embedding", **item} for item in items]
    return {"object": "list", "model": "m", "data": data, "usage": {"prompt_tokens": 2, "total_tokens": 2}}


GOOD = _answer({"index": 0, "embedding": [0.5]}, {"index": 1, "embedding": [0.25]})
CARELESS = {
    "null_vector": _answer({"index": 0, "embedding": None}, {"index": 1, "embedding": [0.25]}),
    "string_for_float": _answer({"index": 0, "embedding": "AAAA"}, {"index": 1, "embedding": [0.25]}),
    "duplicate_index": _answer({"index": 0, "embedding": [0.5]}, {"index": 0, "embedding": [0.25]}),
    "index_out_of_range": _answer({"index": 0, "embedding": [0.5]}, {"index": 99, "embedding": [0.25]}),
}


async def _embed(client: openai.AsyncOpenAI) -> list[list[float]]:
    got = await client.embeddings.create(model="m", input=["a", "b"], encoding_format="float")
    return [d.embedding for d in got.data]


@pytest.mark.parametrize("answer", list(CARELESS.values()), ids=list(CARELESS))
async def test_careless_vectors_fail_over(start_proxy: Start, serve_routes: ServeRoutes, answer: Any) -> None:
    a, b = Hostile([], json_body=answer), Hostile([], json_body=GOOD)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/embeddings")
    async with _oai(proxy) as client:
        assert await _embed(client) == [[0.5], [0.25]]
    rec = await _record(proxy)
    assert [t.outcome for t in rec.attempts] == ["server_error", "success"]


@pytest.mark.parametrize("answer", list(CARELESS.values()), ids=list(CARELESS))
async def test_careless_vectors_everywhere_are_a_502(
    start_proxy: Start, serve_routes: ServeRoutes, answer: Any
) -> None:
    a, b = Hostile([], json_body=answer), Hostile([], json_body=answer)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/embeddings")
    async with _oai(proxy) as client:
        with pytest.raises(openai.InternalServerError) as got:
            await _embed(client)
    assert got.value.status_code == 502 and isinstance(got.value.body, dict)
    assert got.value.body["code"] == "upstream_failed"


async def test_base64_vectors_and_no_indices_are_an_answer(start_proxy: Start, serve_routes: ServeRoutes) -> None:
    answer = _answer({"embedding": "AAAAPw=="}, {"embedding": "AACAPg=="})  # 0.5, 0.25 as float32
    a, b = Hostile([], json_body=answer), Hostile([], json_body=GOOD)
    proxy = await _proxy(start_proxy, serve_routes, a, b, path="/v1/embeddings")
    async with _oai(proxy) as client:
        got = await client.embeddings.create(model="m", input=["a", "b"])  # the SDK asks for base64
    assert [d.embedding for d in got.data] == [[0.5], [0.25]] and b.calls == 0
