"""Arbitrary bodies never make the proxy fail: every answer is a success or an
OpenAI-format client error, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import simple_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values, "name": json_values, "tool_calls": json_values},
    ),
    max_size=4,
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "nope"]) | json_values,
        "messages": messages | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-5, 10**10) | json_values,
        "stream_options": json_values,
        "tools": json_values,
        "user": json_values,
    },
)


async def test_arbitrary_bodies_get_a_clear_answer(start_upstream, start_proxy) -> None:
    up = await start_upstream()
    proxy = await start_proxy(simple_config({"a": up}))
    seen: list[int] = []

    async def check(session: aiohttp.ClientSession, raw: bytes) -> None:
        for path in ("/v1/chat/completions", "/v1/messages"):
            async with session.post(proxy.url + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                text = await r.read()
                seen.append(r.status)
                assert r.status in (200, 400, 404, 502), (path, r.status, raw, text)
                if r.status != 200:
                    answer = orjson.loads(text)
                    if path == "/v1/messages":  # Anthropic's error shape
                        assert answer["type"] == "error"
                    err: dict[str, Any] = answer["error"]
                    assert err["message"] and "Traceback" not in err["message"]

    samples: list[bytes] = []

    @settings(max_examples=300, suppress_health_check=list(HealthCheck), deadline=None)
    @given(bodies)
    def collect(body: dict[str, Any]) -> None:
        samples.append(orjson.dumps(body))

    collect()
    samples += [
        b'{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}',
        b"\xff\xfe",
        b'{"model": "m", "messages": [' * 200,
        b"null",
        b"1e999",
        b'{"model":"m"}' * 3,
    ]
    async with aiohttp.ClientSession() as session:
        for i in range(0, len(samples), 20):
            await asyncio.gather(*(check(session, raw) for raw in samples[i : i + 20]))
    assert 200 in seen and 400 in seen
