"""An upstream's usage past what its request could have been billed: charged at the bound.

"hello" to a request with `max_tokens: 10` reported as 1e9 output tokens was charged $2,000,000
(at $2,000/M here); a one-line prompt reported as 1e9 prompt tokens $1,000,000. Output is
charged at most at what the stream output cap lets through (twice the bound times `n`, 64
tokens more) or the answer's bytes if longer; a prompt at most at the request's bytes and a
margin. Honest counts within those bounds (reasoning, `n`, an upstream that ignored the bound
and wrote on, input a provider adds with its search tools) are charged as reported.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from edgeroute.accounting import OVERRAN
from edgeroute.cost.overreport import CODE
from tests.conftest import Proxy, ServeRoutes, eventually
from tests.metrics_support import scrape

HUGE = 1_000_000_000
PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}


def _completion(text: str, usage: dict[str, Any], n: int = 1) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} for i in range(n)
    ]
    return {"id": "c-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini", "choices": choices,
            "usage": usage}  # fmt: skip


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    obj["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _usage(prompt: int, completion: int, **extra: Any) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, **extra}


class Liar:
    """An upstream that answers "hello" (or `text`) with `usage`, as JSON or as a stream."""

    def __init__(self, usage: dict[str, Any], text: str = "hello") -> None:
        self.usage = usage
        self.text = text

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(_completion(self.text, self.usage, body.get("n") or 1))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_chunk({"role": "assistant", "content": self.text}))
        await resp.write(_chunk({}, "stop"))
        await resp.write(_chunk(None, usage=self.usage) + b"data: [DONE]\n\n")
        return resp

    async def messages(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def ev(name: str, obj: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode()

        start = {"input_tokens": self.usage["prompt_tokens"], "output_tokens": 1}
        msg: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                               "content": [], "stop_reason": None, "usage": start}  # fmt: skip
        await resp.write(
            ev("message_start", {"message": msg})
            + ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            + ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": self.text}})
            + ev("content_block_stop", {"index": 0})
            + ev(
                "message_delta",
                {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": self.usage["completion_tokens"]}},
            )
            + ev("message_stop", {})
        )
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seq = iter(range(100))
        at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}

        def ev(name: str, **fields: Any) -> bytes:
            obj = {"type": name, "sequence_number": next(seq), **fields}
            return f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode()

        response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress",
                    "model": "gpt-4o-mini", "output": [], "usage": None}  # fmt: skip
        message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": self.text, "annotations": []}]}  # fmt: skip
        usage = {"input_tokens": self.usage["prompt_tokens"], "output_tokens": self.usage["completion_tokens"],
                 "total_tokens": self.usage["prompt_tokens"] + self.usage["completion_tokens"]}  # fmt: skip
        await resp.write(
            ev("response.created", response=response)
            + ev("response.output_item.added", output_index=0, item={**message, "status": "in_progress", "content": []})
            + ev("response.content_part.added", **at, part={"type": "output_text", "text": "", "annotations": []})
            + ev("response.output_text.delta", **at, delta=self.text, logprobs=[])
            + ev("response.output_text.done", **at, text=self.text, logprobs=[])
            + ev("response.content_part.done", **at, part=message["content"][0])
            + ev("response.output_item.done", output_index=0, item=message)
            + ev(
                "response.completed", response={**response, "status": "completed", "output": [message], "usage": usage}
            )
        )
        return resp


async def _proxy(start_proxy: Any, serve_routes: ServeRoutes, liar: Liar, kind: str = "openai") -> Proxy:
    server = await serve_routes(
        web.post("/v1/chat/completions", liar.chat),
        web.post("/v1/messages", liar.messages),
        web.post("/v1/responses", liar.responses),
    )
    provider: dict[str, Any] = {"kind": kind, "api_key": "key-a", "base_url": server.url + "/v1"}
    if kind == "anthropic":
        provider["base_url"] = server.url
    model = "claude-sonnet-4-5" if kind == "anthropic" else "gpt-4o-mini"
    cfg = {
        "providers": {"a": provider},
        "deployments": {"d-a": {"provider": "a", "model": model, "price": PRICE}},
        "models": {"m": {"deployments": ["d-a"]}},
    }
    proxy: Proxy = await start_proxy(cfg)
    return proxy


async def _record(proxy: Proxy) -> Any:
    async def probe() -> Any:
        return proxy.recorder.records[-1] if proxy.recorder.records else None

    return await eventually(probe, "the request's record")


def _client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


HELLO: list[Any] = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_output_past_the_requests_bound_is_charged_at_the_bound(
    start_proxy: Any, serve_routes: ServeRoutes, stream: bool
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(9, HUGE)))
    async with _client(proxy) as client:
        if stream:
            chunks = await client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices]) == "hello"
        else:
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=HELLO, max_tokens=10)
            assert raw.parse().choices[0].message.content == "hello"
            assert float(raw.headers["x-edgeroute-cost-usd"]) < 3.0  # not $2,000,000
    rec = await _record(proxy)
    assert rec.usage.completion_tokens <= 2 * 10 + 64 + 1024  # the cap's limit, or the answer's bytes
    assert rec.usage.estimated and rec.error_class == OVERRAN
    assert rec.cost_usd < 3.0


async def test_an_anthropic_stream_past_its_max_tokens_is_charged_at_the_bound(
    start_proxy: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(9, HUGE)), kind="anthropic")
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0) as client:
        async with client.messages.stream(model="m", max_tokens=10, messages=HELLO) as stream:
            assert (await stream.get_final_message()).content[0].text == "hello"  # type: ignore[union-attr]
    rec = await _record(proxy)
    assert rec.usage.completion_tokens == 2 * 10 + 64 and rec.usage.estimated and rec.error_class == OVERRAN


async def test_a_responses_stream_past_its_max_output_tokens_is_charged_at_the_bound(
    start_proxy: Any, serve_routes: ServeRoutes
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(9, HUGE)))
    async with _client(proxy) as client:
        stream = await client.responses.create(model="m", input="hello", max_output_tokens=10, stream=True)
        assert [e.type async for e in stream][-1] == "response.completed"
    rec = await _record(proxy)
    assert rec.usage.completion_tokens == 2 * 10 + 64 and rec.error_class == OVERRAN


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_prompt_past_the_requests_bytes_is_charged_at_them(
    start_proxy: Any, serve_routes: ServeRoutes, stream: bool
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(HUGE, 1)))
    async with _client(proxy) as client:
        if stream:
            [c async for c in await client.chat.completions.create(model="m", messages=HELLO, stream=True)]
        else:
            await client.chat.completions.create(model="m", messages=HELLO)
    rec = await _record(proxy)
    assert rec.usage.prompt_tokens <= 5000 and rec.usage.estimated and rec.error_class == CODE
    assert rec.cost_usd < 6.0  # not $1,000,000
    metrics = await scrape(proxy.url)  # the operator sees which deployment reports impossible counts
    assert metrics.value("edgeroute_upstream_usage_corrections_total", deployment="d-a", kind=CODE) == 1


@pytest.mark.parametrize(
    ("usage", "asked", "text"),
    [
        # a reasoning model's hidden reasoning within max_completion_tokens
        (_usage(9, 150, completion_tokens_details={"reasoning_tokens": 140}), {"max_completion_tokens": 100}, "hi"),
        # n answers, each within max_tokens
        (_usage(9, 60), {"max_tokens": 20, "n": 3}, "hello"),
        # an upstream that ignored max_tokens and wrote on: its text is billed
        (_usage(9, 500), {"max_tokens": 10}, "word " * 500),
        # no bound: as reported
        (_usage(9, 100_000), {}, "hello"),
        # a Predicted Output: rejected prediction tokens are billed beyond max_tokens
        (_usage(9, 5000), {"max_tokens": 10, "prediction": {"type": "content", "content": "x " * 4000}}, "hello"),
        # a thinking budget (Anthropic's interleaved thinking may think past max_tokens)
        (
            _usage(9, 5000),
            {"max_tokens": 10, "extra_body": {"thinking": {"type": "enabled", "budget_tokens": 8000}}},
            "hello",
        ),
        # a search tool adds input edgeroute never sent
        (_usage(60_000, 5), {"web_search_options": {}}, "hello"),
    ],
    ids=["reasoning", "n", "ignored_bound", "unbounded", "prediction", "thinking_budget", "web_search"],
)
async def test_counts_a_provider_could_bill_are_charged_as_reported(
    start_proxy: Any, serve_routes: ServeRoutes, usage: dict[str, Any], asked: dict[str, Any], text: str
) -> None:
    proxy = await _proxy(start_proxy, serve_routes, Liar(usage, text))
    async with _client(proxy) as client:
        await client.chat.completions.create(model="m", messages=HELLO, **asked)
    rec = await _record(proxy)
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert not rec.usage.estimated


async def test_a_word_hidden_by_an_escape_still_keeps_an_honest_bill(
    start_proxy: Any, serve_routes: ServeRoutes
) -> None:
    """The bound read the body's bytes for what makes a provider bill more: `web_\\u0073earch_options`
    reaches the upstream as `web_search_options`, and an honest 60,000-token bill was charged 4,182."""
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(60_000, 5)))
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}], "web_\\u0073earch_options": {}}'
    async with _client(proxy) as client:
        await client.post("/chat/completions", content=body, cast_to=object, options={"headers": _JSON})
    rec = await _record(proxy)
    assert rec.usage.prompt_tokens == 60_000 and not rec.usage.estimated


async def test_azure_data_sources_keep_an_honest_bill(start_proxy: Any, serve_routes: ServeRoutes) -> None:
    """Azure OpenAI "On Your Data" bills the documents it retrieved as prompt."""
    proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(30_000, 5)))
    sources = [{"type": "azure_search", "parameters": {"endpoint": "https://s.example", "index_name": "docs"}}]
    async with _client(proxy) as client:
        await client.chat.completions.create(model="m", messages=HELLO, extra_body={"data_sources": sources})
    rec = await _record(proxy)
    assert rec.usage.prompt_tokens == 30_000 and not rec.usage.estimated


async def test_other_apis_are_bounded_by_the_clients_own_request(start_proxy: Any, serve_routes: ServeRoutes) -> None:
    """`/v1/responses` and `/v1/messages` were bounded by the routing body edgeroute makes of the
    request, without the stored conversation, server tools or thinking budget that bill more:
    honest 100,000- and 40,000-token prompts and a 5,000-token thinking answer were charged a fraction."""
    liar = Liar(_usage(100_000, 5))
    proxy = await _proxy(start_proxy, serve_routes, liar)
    async with _client(proxy) as client:
        events = await client.responses.create(model="m", input="hi", previous_response_id="resp_0", stream=True)
        [e async for e in events]
    rec = await _record(proxy)
    assert rec.usage.prompt_tokens == 100_000 and not rec.usage.estimated
    anthropic_proxy = await _proxy(start_proxy, serve_routes, Liar(_usage(40_000, 5_000)), kind="anthropic")
    claude = anthropic.AsyncAnthropic(base_url=anthropic_proxy.url, api_key="x", max_retries=0)
    try:
        async with claude.messages.stream(
            model="m", max_tokens=1000, messages=HELLO,
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
            thinking={"type": "enabled", "budget_tokens": 800},
        ) as stream:  # fmt: skip
            await stream.get_final_message()
    finally:
        await claude.close()
    rec = await _record(anthropic_proxy)
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (40_000, 5_000) and not rec.usage.estimated


_JSON = {"Content-Type": "application/json"}
