"""`bench throughput --upstream nginx`: nginx answers as an OpenAI upstream would, through the proxy too."""

from __future__ import annotations

import asyncio
import shutil

import openai
import pytest

from edgeroute.bench import nginx_upstream, wrk
from edgeroute.bench.stack import Stack

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (.ci/start-services installs nginx-light)"
)


def test_the_canned_answer_is_a_chat_completion_the_sdk_reads() -> None:
    with Stack(pin=False) as stack:
        up = stack.nginx()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}])
        assert got.choices[0].message.content == "The quick brown fox."
        assert got.choices[0].finish_reason == "stop"
        assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (12, 6)
        assert [m.id for m in client.models.list()] == [nginx_upstream.MODEL]
        assert up.cpu_seconds() >= 0 and up.alive()
    assert not up.alive()  # the stack stops what it started


async def test_the_proxy_serves_nginx_answers_under_load(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with Stack(pin=False) as stack:
        up = stack.nginx()
        cfg = {
            "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
        }
        proxy = await start_proxy(cfg)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert got.choices[0].message.content == "The quick brown fox."
        if shutil.which("wrk") is not None:  # kept-alive connections under a closed loop: every answer a 200
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            res = await asyncio.to_thread(wrk.run, proxy.url + "/v1/chat/completions", body, 1, 8)
            assert res.requests > 0 and res.non_2xx == 0 and res.errors == 0
