"""An Anthropic deployment's JSON answer in a shape Anthropic's protocol does not have (its
`content` a string, a block that is not an object) is that deployment's failure: failed over
as a server error, said in one log line, without a traceback (one per attempt before)."""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest

from tests.conftest import ServeRoutes
from tests.test_answers_in_200_that_are_not import Hostile, Start, _oai, _proxy, _record

_GOOD = {
    "id": "msg_2",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "from b"}],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 5, "output_tokens": 3},
}


@pytest.mark.parametrize(
    ("content", "why"),
    [("hello", "content is not a list"), (["hello"], "content block that is not an object")],
)
async def test_an_answer_whose_content_is_not_blocks_fails_over_without_a_traceback(
    start_proxy: Start, serve_routes: ServeRoutes, caplog: pytest.LogCaptureFixture, content: Any, why: str
) -> None:
    a, b = Hostile([], json_body={**_GOOD, "id": "msg_1", "content": content}), Hostile([], json_body=_GOOD)
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    with caplog.at_level(logging.INFO):
        got = await _oai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        rec = await _record(proxy)
    assert got.choices[0].message.content == "from b"
    assert a.calls >= 1 and b.calls == 1
    assert rec.deployment == "d-b"
    assert not [r for r in caplog.records if r.exc_info], "a careless answer logged a traceback"
    assert any(why in r.getMessage() for r in caplog.records), caplog.text


async def test_with_no_other_deployment_the_client_gets_a_502(
    start_proxy: Start, serve_routes: ServeRoutes, caplog: pytest.LogCaptureFixture
) -> None:
    bad = {**_GOOD, "content": "hello"}
    a, b = Hostile([], json_body=bad), Hostile([], json_body=bad)
    proxy = await _proxy(start_proxy, serve_routes, a, b, kind="anthropic")
    with caplog.at_level(logging.INFO), pytest.raises(openai.APIStatusError) as e:
        await _oai(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502
    assert not [r for r in caplog.records if r.exc_info], "a careless answer logged a traceback"
