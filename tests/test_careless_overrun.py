"""An upstream that ignores `max_tokens` and streams on: the stream is ended at edgeroute's
limit (twice the bound and 64 tokens more), in the client's format, the upstream's connection
closed and the output it sent priced; an answer within the limit is never cut."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from edgeroute.dispatch.output_cap import OutputCap, output_limit
from tests.conftest import ServeRoutes, eventually
from tests.metrics_support import scrape

WORDS = "word " * 100  # 100 tokens an event


class Flood:
    """An upstream that streams `events` words-events after its first, forever unless `events` is set."""

    def __init__(self, events: int | None = None) -> None:
        self.events = events
        self.sent = 0
        self.closed = asyncio.Event()

    async def _pump(self, request: web.Request, write: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            n = 0
            while self.events is None or n < self.events:
                await resp.write(write(WORDS))
                self.sent += 1
                n += 1
                await asyncio.sleep(0.01)
            await resp.write(write(None))
        finally:  # a write to the closed connection fails, or the handler is cancelled
            self.closed.set()
        return resp

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()

        def chunk(text: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": None}
            if text is None:
                choice["finish_reason"] = "stop"
            ev = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [choice],
            }
            return b"data: " + json.dumps(ev).encode() + b"\n\n" + (b"data: [DONE]\n\n" if text is None else b"")

        return await self._pump(request, chunk)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        started = [False]

        def ev(name: str, obj: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode()

        def event(text: str | None) -> bytes:
            out = b""
            if not started[0]:
                started[0] = True
                msg = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                       "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}  # fmt: skip
                out += ev("message_start", {"message": msg})
                out += ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            if text is None:
                return (
                    out
                    + ev("content_block_stop", {"index": 0})
                    + ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}})
                    + ev("message_stop", {})
                )
            return out + ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

        return await self._pump(request, event)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """A Responses stream of one message (after a reasoning item), its text never ending."""
        body = await request.json()
        seq = iter(range(1 << 30))
        at = {"item_id": "msg_1", "output_index": 1, "content_index": 0}

        def ev(name: str, **fields: Any) -> bytes:
            obj = {"type": name, "sequence_number": next(seq), **fields}
            return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

        reasoning = {"type": "reasoning", "id": "rs_1", "summary": []}
        response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress",
                    "model": body["model"], "output": [], "usage": None}  # fmt: skip
        head = (
            ev("response.created", response=response)
            + ev("response.output_item.added", output_index=0, item=reasoning)
            + ev("response.output_item.done", output_index=0, item=reasoning)
            + ev("response.output_item.added", output_index=1, item={
                "type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []})
            + ev("response.content_part.added", **at, part={"type": "output_text", "text": "", "annotations": []})
        )  # fmt: skip
        started = [False]

        def event(text: str | None) -> bytes:
            out = b"" if started[0] else head
            started[0] = True
            if text is not None:
                return out + ev("response.output_text.delta", **at, delta=text, logprobs=[])
            done = {**response, "status": "completed", "output": [], "usage": {"input_tokens": 1, "output_tokens": 1}}
            return out + ev("response.completed", response=done)

        return await self._pump(request, event)


def _config(url: str, kind: str = "openai_compatible", responses: bool = False) -> dict[str, Any]:
    base = url + "/v1" if kind == "openai_compatible" else url
    return {
        "providers": {
            "p": {"kind": kind, "base_url": base, "api_key": "k", "options": {"responses": True} if responses else {}}
        },
        "deployments": {
            "d": {"provider": "p", "model": "x", "price": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}
        },
        "models": {"m": {"deployments": ["d"]}},
    }


async def _proxy(
    start_proxy: Any, serve_routes: ServeRoutes, flood: Flood, kind: str = "openai_compatible", responses: bool = False
) -> Any:
    up = await serve_routes(
        web.post("/v1/chat/completions", flood.chat),
        web.post("/v1/messages", flood.messages),
        web.post("/v1/responses", flood.responses),
    )
    return await start_proxy(_config(up.url, kind, responses))


async def _record(proxy: Any) -> Any:
    async def written() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(written, "the request's record")


async def _closed(flood: Flood) -> None:
    await asyncio.wait_for(flood.closed.wait(), 10)  # the upstream saw its connection closed


async def test_chat_stream_past_max_tokens_ends_at_its_length(start_proxy, serve_routes) -> None:
    # Was: every event relayed for as long as the upstream sent (199 events, $19.9 of a $1 budget).
    flood = Flood()
    proxy = await _proxy(start_proxy, serve_routes, flood)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi"}],
    )
    text, finish, usage = "", None, None
    async with asyncio.timeout(20):
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens > 74  # edgeroute's count, as asked for
    assert 74 < text.count("word") <= 300  # past the limit (2 x 5 + 64), by one burst at most
    await _closed(flood)
    rec = await _record(proxy)
    assert rec.error_class == "upstream_overran_max_tokens"
    usage = rec.attempts[0].usage
    assert usage is not None and usage.completion_tokens >= 74  # what was relayed is priced
    assert rec.attempts[0].cost_usd > 0.07
    metrics = await scrape(proxy.url)
    assert metrics.value("edgeroute_upstream_overruns_total", deployment="d") == 1


async def test_messages_stream_past_max_tokens_stops_at_max_tokens(start_proxy, serve_routes) -> None:
    # Through the chat translation (an OpenAI-format upstream), and an Anthropic upstream's
    # events relayed as they are (`top_k`: only Anthropic honours it).
    for kind, extra in (("openai_compatible", {}), ("anthropic", {}), ("anthropic", {"extra_body": {"top_k": 5}})):
        flood = Flood()
        proxy = await _proxy(start_proxy, serve_routes, flood, kind)
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
        async with asyncio.timeout(20):
            async with client.messages.stream(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}], **extra
            ) as stream:
                async for _ in stream:
                    pass
                msg = await stream.get_final_message()
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens > 74, kind
        assert 74 < msg.content[0].text.count("word") <= 300, kind
        await _closed(flood)
        rec = await _record(proxy)
        assert rec.error_class == "upstream_overran_max_tokens", kind
        assert rec.attempts[0].usage is not None and rec.attempts[0].usage.completion_tokens >= 74, kind


async def test_answer_within_the_limit_is_not_cut(start_proxy, serve_routes) -> None:
    # 100 tokens for max_tokens 40: past the bound, within its margin (2 x 40 + 64), relayed whole.
    flood = Flood(events=1)
    proxy = await _proxy(start_proxy, serve_routes, flood)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", max_tokens=40, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    text, finish = "", None
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop" and text == WORDS
    rec = await _record(proxy)
    assert rec.error_class is None


async def test_whole_answer_past_max_tokens_is_charged_and_counted(start_proxy, serve_routes) -> None:
    # A JSON answer cannot be stopped: charged as its upstream reports it, and the operator told.
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": WORDS * 10}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1000, "total_tokens": 1008},
        })  # fmt: skip

    up = await serve_routes(web.post("/v1/chat/completions", answer))
    proxy = await start_proxy(_config(up.url))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    got = await client.chat.completions.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert got.usage is not None and got.usage.completion_tokens == 1000
    rec = await _record(proxy)
    assert rec.attempts[0].usage is not None and rec.attempts[0].usage.completion_tokens == 1000
    assert rec.error_class == "upstream_overran_max_tokens"
    metrics = await scrape(proxy.url)
    assert metrics.value("edgeroute_upstream_overruns_total", deployment="d") == 1


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "native"])
async def test_responses_stream_past_max_output_tokens_ends_incomplete(start_proxy, serve_routes, responses) -> None:
    # Was: an `error` event (the SDK raised). Now `response.incomplete`, as OpenAI ends a stream at
    # its `max_output_tokens`: through the chat translation, and an upstream's own Responses events.
    # 16: the first event (100 tokens) is past the limit; 40: the second is.
    for bound in (16, 40):
        limit = output_limit(bound, 1)
        assert limit is not None
        flood = Flood()
        proxy = await _proxy(start_proxy, serve_routes, flood, responses=responses)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        kinds: list[str] = []
        deltas: list[str] = []
        async with asyncio.timeout(20):
            async with client.responses.stream(model="m", input="hi", max_output_tokens=bound) as stream:
                async for event in stream:
                    kinds.append(event.type)
                    if event.type == "response.output_text.delta":
                        deltas.append(event.delta)
                    last = event
        assert kinds[-1] == "response.incomplete" and "error" not in kinds, (bound, kinds[-5:])
        assert last.type == "response.incomplete"
        final = last.response
        assert final.status == "incomplete" and final.incomplete_details is not None, bound
        assert final.incomplete_details.reason == "max_output_tokens"
        message = final.output[-1]
        assert message.type == "message" and message.status == "incomplete", bound
        text = message.content[0].text  # type: ignore[union-attr]
        assert text == "".join(deltas), bound  # the output so far: what the client was sent, no more
        # Stopped within a read of the limit (8 KiB of events: ~14 of 100 words).
        assert 100 <= text.count("word") <= 1500, bound
        assert final.usage is not None and final.usage.output_tokens > limit, bound  # edgeroute's count
        if responses:
            assert final.id == "resp_1" and final.output[0].type == "reasoning"
        await _closed(flood)
        rec = await _record(proxy)
        assert rec.error_class == "upstream_overran_max_tokens", bound
        usage = rec.attempts[0].usage
        assert usage is not None and usage.completion_tokens > limit, bound  # charged as before


def _chunk(delta: dict[str, Any]) -> bytes:
    ev = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "delta": delta}],
    }
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


async def _past(cap: OutputCap, events: list[bytes]) -> int | None:
    """The event after which `cap` found the stream past its limit, or None."""
    for i, ev in enumerate(events):
        if cap.add(ev) and await cap.past():
            return i
    return None


async def test_the_limit_counts_reasoning_and_reads_escapes() -> None:
    limit = output_limit(16, 1)
    assert limit == 96
    # Reasoning is billed as output: a flood of it is stopped as text is.
    flood = [_chunk({"reasoning_content": "think " * 20})] * 50
    assert await _past(OutputCap(limit, "o200k_base"), flood) == 4  # 100 tokens: past 96
    # Escaped text is counted as the text it is (its escapes would count many more tokens).
    accents = [_chunk({"content": "\u00e9t\u00e9\n" * 8})] * 5  # JSON-escaped: 6 bytes a letter
    assert await _past(OutputCap(limit, "o200k_base"), accents) is None


def _words(n: int) -> bytes:
    return _chunk({"content": "word " * n})


async def _chat_text(proxy: Any) -> tuple[str, str | None]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", max_tokens=5, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    text, finish = "", None
    async with asyncio.timeout(20):
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
    return text, finish


async def test_a_first_event_past_the_limit_is_the_last_sent(start_proxy, serve_routes) -> None:
    """One content event of 2,000 tokens for `max_tokens: 5`, then the end: its first event went
    unmeasured, the end's read was never looked at, and the stream was recorded as a whole answer
    (the red team's 216 KB event: $40 of a $1 budget, outcome ok). The event has gone when it is
    seen (the client needs a stream's first events to read any end), but nothing after it does."""
    closed = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(_words(2000))
            for _ in range(200):
                await asyncio.sleep(0.01)
                await resp.write(_words(100))
            await resp.write(b"data: [DONE]\n\n")
        finally:
            closed.set()
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", chat))
    proxy = await start_proxy(_config(up.url))
    text, finish = await _chat_text(proxy)
    assert finish == "length" and text.count("word") == 2000
    await asyncio.wait_for(closed.wait(), 10)
    rec = await _record(proxy)
    assert rec.error_class == "upstream_overran_max_tokens"


async def test_events_read_together_past_the_limit_are_not_sent(start_proxy, serve_routes) -> None:
    """A burst of events read in one piece (up to 8 KiB) went out whole before the look that found
    it past the limit: 300-1,300 tokens for a limit of 74. Now a piece past the limit is not sent,
    and is still priced (the upstream produced it)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_words(3))
        await asyncio.sleep(0.05)
        await resp.write(b"".join([_words(100)] * 40) + b"data: [DONE]\n\n")
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", chat))
    proxy = await start_proxy(_config(up.url))
    text, finish = await _chat_text(proxy)
    assert finish == "length" and text.count("word") <= 74, text.count("word")
    rec = await _record(proxy)
    assert rec.error_class == "upstream_overran_max_tokens"
    usage = rec.attempts[0].usage
    assert usage is not None and usage.completion_tokens > 74  # what was read, sent or not, is priced


async def test_a_whole_stream_past_the_limit_in_its_first_read_is_counted(start_proxy, serve_routes) -> None:
    """The whole answer, [DONE] included, in the first read: delivered (it is complete), and, as
    a JSON answer past the bound is, charged as it came and counted for the operator."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_words(500) + b"data: [DONE]\n\n")
        return resp

    up = await serve_routes(web.post("/v1/chat/completions", chat))
    proxy = await start_proxy(_config(up.url))
    text, _ = await _chat_text(proxy)
    assert text.count("word") == 500
    rec = await _record(proxy)
    assert rec.error_class == "upstream_overran_max_tokens"
    metrics = await scrape(proxy.url)
    assert metrics.value("edgeroute_upstream_overruns_total", deployment="d") == 1
