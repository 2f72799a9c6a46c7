"""Hostile input: a request body nested hundreds of levels deep.

orjson reads JSON up to 1,024 levels but writes at most 254: a body nested between the two
(in a tool's JSON schema, a `response_format` schema, a `metadata` value, a tool result)
failed every re-serialisation with a 500 and a traceback in the log (the cache key, the
Responses and completions bodies sent on, the Anthropic translation and `count_tokens`, a
Python walk of the Anthropic fields hitting the recursion limit), and one past 1,024 went
upstream, where the provider refused it. Every body nested more than 128 levels (the core's
own bound for messages) is now the client's 400 in its API's format, before any upstream call.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from edgeroute.request_input import too_deep
from tests.conftest import simple_config


def _schema(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        out = {"a": out}
    return out


def _calls(depth: int) -> dict[str, Any]:
    schema = _schema(depth)
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    user: Any = [{"role": "user", "content": "hi"}]
    return {
        "chat_tools": lambda c: c.chat.completions.create(model="m", messages=user, tools=tools, temperature=0),
        "chat_schema": lambda c: c.chat.completions.create(
            model="m",
            messages=user,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        ),
        "responses_tools": lambda c: c.responses.create(
            model="m", input="hi", tools=[{"type": "function", "name": "f", "parameters": schema, "strict": False}]
        ),
        "completions": lambda c: c.completions.create(model="m", prompt="hi", extra_body={"metadata": schema}),
    }


def _anthropic_calls(depth: int) -> dict[str, Any]:
    schema = _schema(depth)
    user: Any = [{"role": "user", "content": "hi"}]
    tools: Any = [{"name": "f", "input_schema": schema}]
    return {
        "messages_tools": lambda c: c.messages.create(model="m", max_tokens=10, messages=user, tools=tools),
        "count_tokens": lambda c: c.messages.count_tokens(model="m", messages=user, tools=tools),
    }


@pytest.mark.parametrize("depth", [200, 900])
@pytest.mark.parametrize("call", list(_calls(2)))
async def test_a_deeply_nested_body_is_a_400_with_the_openai_sdk(
    start_upstream: Any, start_proxy: Any, call: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    cfg["models"]["m"]["cache"] = {"ttl": 60}
    proxy = await start_proxy(cfg)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as got:
        await _calls(depth)[call](client)
    assert got.value.status_code == 400
    assert "nested more than 128 levels" in str(got.value.message)
    assert up.options.requests == []  # refused before any upstream call
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    # A body within the bound is served as before.
    await _calls(20)[call](client)
    assert len(up.options.requests) == 1


@pytest.mark.parametrize("depth", [200, 900])
@pytest.mark.parametrize("call", list(_anthropic_calls(2)))
async def test_a_deeply_nested_body_is_a_400_with_the_anthropic_sdk(
    start_upstream: Any, start_proxy: Any, call: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(simple_config({"a": up}))
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as got:
        await _anthropic_calls(depth)[call](client)
    assert "nested more than 128 levels" in str(got.value.message)
    assert up.options.requests == []
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    await _anthropic_calls(20)[call](client)


async def test_a_body_past_the_json_readers_own_bound_is_the_same_400(start_upstream: Any, start_proxy: Any) -> None:
    """Past 1,024 levels (more than the SDKs' encoders write) the body went upstream unread,
    and the provider refused it."""
    up = await start_upstream(record=True)
    proxy = await start_proxy(simple_config({"a": up}))
    depth = 1100
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":'
        + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    )  # fmt: skip
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{proxy.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["type"] == "invalid_request_error" and "nested more than 128 levels" in err["message"]
    assert up.options.requests == []


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"[" * 128 + b"]" * 128, False),  # at the bound
        (b"[" * 129 + b"]" * 129, True),  # one past it
        (b"{" + b'"a":{' * 128 + b"1" + b"}" * 129, True),  # objects alone
        (b'{"a":[' + b",".join([b'{"x":[1]}'] * 300) + b"]}", False),  # 901 brackets, 4 deep
        (b'{"a":"' + b"[{" * 500 + b'"}', False),  # brackets in a string are text
    ],
)
def test_depth_is_judged_by_nesting_not_by_the_number_of_brackets(body: bytes, deep: bool) -> None:
    """The bracket count is only a shortcut: past it, the nesting itself decides."""
    assert too_deep(body) is deep


async def test_a_large_body_is_scanned_off_the_event_loop(
    start_upstream: Any, start_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depth scan reads every byte (20 ms for 10 MB of token ids, a body with few brackets):
    it ran on the event loop for any body, every other request waiting; past 64 KiB it runs in
    a worker thread with the repeated-key scan, and still refuses a deep body."""
    import threading

    from edgeroute import request_input

    seen: list[bool] = []

    scans = request_input._scans

    def spied(body: bytes) -> tuple[bool, str | None]:
        seen.append(threading.current_thread() is threading.main_thread())
        return scans(body)

    monkeypatch.setattr(request_input, "_scans", spied)
    proxy = await start_proxy(simple_config({"a": await start_upstream()}))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        big = "word " * 30_000  # 150 kB, no brackets to speak of
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": big}])
        with pytest.raises(openai.BadRequestError, match="nested more than 128"):
            await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": big}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": _schema(200)}}],
            )
    finally:
        await client.close()
    assert seen == [True, False, False]  # a small body on the loop, the large ones in a worker
