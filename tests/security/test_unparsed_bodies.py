"""A body the core takes but orjson cannot read. The core skips a field it does not read without
decoding it, so a number past a double (`"zz": 1e400`, or an integer of 400 digits) or a lone
surrogate escape (`"zz": "\\ud800"`) there passes it, and goes upstream as sent; Python's json,
JavaScript's and Go's parsers read such a body. The checks that parse the body again (audio named by
id: its owner and its reservation; a provider's file_id; media reserved for) returned "nothing
named" on it: team t had team u's clip read, and overspent its budget. Such a body is now refused
with a 400 saying it is not valid JSON, before any upstream call; a body none of those checks reads
passes as before.

The client is the official openai SDK (`extra_body` adds the field). The bundled OpenAI mock's
orjson is swapped for Python's json, standing for a provider that reads such bodies."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

import edgeroute.mock.openai as mock_openai
from tests.security.test_chat_audio_budgets import APP, LIMITED, _client, _clip, _config
from tests.test_cost_support import cost_proxy

HUGE = {"zz": 10**400}  # the SDK writes every digit: past a double for orjson, skipped by the core
IMAGE = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture
def tolerant_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = types.SimpleNamespace(loads=json.loads, dumps=orjson.dumps, JSONDecodeError=json.JSONDecodeError)
    monkeypatch.setattr(mock_openai, "orjson", reader)


def _unparsed(e: pytest.ExceptionInfo[openai.BadRequestError]) -> None:
    err: Any = e.value.body
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request", err
    assert err["message"].startswith("The request body is not valid JSON: "), err


NAMED: dict[str, list[Any]] = {
    "file_id": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-of-another-tenant"}}]}],
    "image": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}],
}


@pytest.mark.usefixtures("tolerant_mock")
async def test_another_teams_audio_is_not_read_through_an_unparsed_field(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream(audio_tokens_per_word=1000, record=True)
    async with _proxy(up, tmp_path) as proxy:
        async with _client(proxy.url, LIMITED) as other:
            aid = await _clip(other, False)  # team u's clip
        sent = len(up.options.requests)
        messages: Any = [{"role": "user", "content": "speak"}, {"role": "assistant", "audio": {"id": aid}}]
        messages.append({"role": "user", "content": "again?"})
        async with _client(proxy.url, APP) as team_t:
            with pytest.raises(openai.NotFoundError):  # as it stands: not team t's
                await team_t.chat.completions.create(model="m", messages=messages, max_tokens=5)
            with pytest.raises(openai.BadRequestError) as e:
                await team_t.chat.completions.create(model="m", messages=messages, max_tokens=5, extra_body=HUGE)
            _unparsed(e)
            assert await _raw_surrogate(proxy.url, messages) == 400
            assert len(up.options.requests) == sent  # none reached the provider
            # A body no check reads (no audio named) passes as it did: the core and the provider take it.
            done = await team_t.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_body=HUGE
            )
    assert done.choices[0].message.content


@pytest.mark.usefixtures("tolerant_mock")
@pytest.mark.parametrize("what", list(NAMED))
async def test_a_file_id_or_media_in_an_unparsed_body_is_refused(
    what: str, start_upstream: Any, tmp_path: Path
) -> None:
    """A provider's file_id is refused for tenants; an image is reserved for: neither is skipped."""
    up = await start_upstream(record=True)
    async with _proxy(up, tmp_path) as proxy, _client(proxy.url, APP) as team_t:
        with pytest.raises(openai.BadRequestError) as e:
            await team_t.chat.completions.create(model="m", messages=NAMED[what], max_tokens=5, extra_body=HUGE)
        _unparsed(e)
    assert up.options.requests == []


def _proxy(up: Any, tmp_path: Path) -> Any:
    return cost_proxy(_config(up, tmp_path))


async def _raw_surrogate(url: str, messages: Any) -> int:
    """The status for the request with a lone surrogate escape in a field the core skips (the
    SDK cannot write one: it encodes its body as UTF-8)."""
    body = orjson.dumps({"model": "m", "messages": messages, "max_tokens": 5})[:-1] + b',"zz":"\\ud800"}'
    headers = {"authorization": f"Bearer {APP}", "content-type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
        got = await r.json()
        assert got["error"]["message"].startswith("The request body is not valid JSON: "), got
        return r.status


async def test_a_stream_whose_options_orjson_cannot_read_is_a_400(start_upstream: Any, tmp_path: Path) -> None:
    """A stream is asked upstream with usage: options that cannot be spliced are parsed whole,
    which raised on such a body (a 500, "Internal error in edgeroute")."""
    up = await start_upstream(record=True)
    async with _proxy(up, tmp_path) as proxy, _client(proxy.url, APP) as team_t:
        options = {"stream_options": {"include_usage": False, "zz": 10**400}}
        with pytest.raises(openai.BadRequestError) as e:
            await team_t.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True, extra_body=options
            )
        _unparsed(e)
    assert up.options.requests == []


async def test_a_prediction_orjson_cannot_read_is_a_400(start_upstream: Any, tmp_path: Path) -> None:
    """The core keeps `prediction` unread, for its tokens to be counted: such a value within was
    a 500."""
    up = await start_upstream(record=True)
    async with _proxy(up, tmp_path) as proxy, _client(proxy.url, APP) as team_t:
        predicted = {"prediction": {"type": "content", "content": "hi", "zz": 10**400}}
        with pytest.raises(openai.BadRequestError) as e:
            await team_t.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_body=predicted
            )
        _unparsed(e)
    assert up.options.requests == []
