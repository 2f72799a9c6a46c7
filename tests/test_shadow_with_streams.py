"""Shadow mirrors (`shadow:`) of streamed requests: a client that streams is mirrored as one
that does not is, once its stream has ended cleanly, and the pair is logged with the text the
client was streamed.

Only JSON answers were mirrored: with `percent: 100` and clients that stream (the official
SDKs' chat UIs, `/v1/messages` with `stream: true`), the candidate model saw nothing and the
shadow log stayed empty, with no sign why. The proxy is the real app on edgeroute's HTTP
server; the openai and anthropic SDKs are the clients."""

from __future__ import annotations

from typing import Any

import anthropic
import openai

from edgeroute.shadow_log import SHADOW_LOG
from tests.conftest import eventually, shadow_config

FREE = {"input_per_mtok": 0, "output_per_mtok": 1.0}


def _config(up: Any) -> dict[str, Any]:
    # The pairs' answers kept as the request log keeps content.
    return shadow_config(up.base_url, FREE, request_log={"log_content": "full"})


async def test_streamed_requests_are_mirrored_once_their_stream_ends(start_upstream: Any, start_proxy: Any) -> None:
    up = await start_upstream(record=True)
    proxy = await start_proxy(_config(up))
    say = [{"role": "user", "content": "tell me a joke"}]
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=say, stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert streamed and raw.headers["x-edgeroute-deployment"] == "cheap"
    oai_id = raw.headers["x-request-id"]
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    async with claude.messages.stream(model="m", max_tokens=100, messages=say) as s:  # type: ignore[arg-type]
        final = await s.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text

    async def mirrors() -> list[Any] | None:
        got = [r for r in proxy.recorder.records if r.shadow_of]
        return got if len(got) == 2 else None

    shadows = await eventually(mirrors, "both streamed requests mirrored", within=10)
    primaries = [r for r in proxy.recorder.records if not r.shadow_of]
    assert {r.shadow_of for r in shadows} == {r.request_id for r in primaries}
    assert oai_id in {r.shadow_of for r in shadows}
    for r in shadows:
        assert r.route == "s" and r.deployment == "strong" and r.status == 200 and r.cost_usd > 0
    # The candidate was asked without streaming, as a JSON client's mirror is.
    mirrored = [q["body"] for q in up.options.requests if q["body"]["model"] == "gpt-4o"]
    assert len(mirrored) == 2 and all(not b.get("stream") and "stream_options" not in b for b in mirrored)
    pairs = {p["request_id"]: p for p in proxy.app[SHADOW_LOG].pairs}
    assert pairs[oai_id]["primary"]["answer"] == streamed
    assert pairs[oai_id]["shadow"]["route"] == "s" and "gpt-4o" in pairs[oai_id]["shadow"]["answer"]
    await client.close()
    await claude.close()


async def test_a_stream_cut_short_is_not_mirrored(start_upstream: Any, start_proxy: Any) -> None:
    """As a failed JSON request is not: only an answer the client got whole is compared."""
    up = await start_upstream(record=True, reply_words=400, chunk_interval=0.01)
    proxy = await start_proxy(_config(up))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "tell me a long story"}], stream=True
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()  # the client hangs up mid-stream

    # Then a stream the client reads to its end: mirrored; the cut one, which ended first, is not.
    up.options.reply_words, up.options.chunk_interval = 12, 0.0
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "a short one"}], stream=True
    )
    async for _ in raw.parse():
        pass
    whole = raw.headers["x-request-id"]

    async def mirrored() -> list[Any] | None:
        got = [r for r in proxy.recorder.records if r.shadow_of]
        return got or None

    shadows = await eventually(mirrored, "the whole stream mirrored", within=10)
    assert len(proxy.recorder.records) == 3  # the cut request, the whole one and its mirror
    assert [r.shadow_of for r in shadows] == [whole]
    assert len([q for q in up.options.requests if q["body"]["model"] == "gpt-4o"]) == 1
    await client.close()
