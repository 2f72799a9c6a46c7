"""What a careless upstream's usage costs: a streamed completion is asked for its usage (as a
chat stream is), an `echo` answer's repeated prompt is no output, and a usage that counts no
prompt tokens for a prompt that has some is counted rather than priced at nothing."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from edgeroute import _core
from tests.conftest import ServeRoutes, eventually

PROMPT = "The quick brown fox jumps over the lazy dog." * 60  # ~600 tokens
ANSWER = " ok ok ok"  # 3 tokens
ZERO = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Careless:
    """An OpenAI-format upstream whose behaviour is the prompt's first word: `nousage` never
    reports usage (asked or not), `zero` reports zeros, `strict` refuses `stream_options`
    (as Mistral does); else usage as OpenAI sends it (in a stream only when asked)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        word = (prompts[0].split() or [""])[0]
        if word == "strict" and "stream_options" in body:
            err = {"message": "Extra inputs are not permitted: stream_options", "type": "invalid_request_error"}
            return web.json_response({"error": err}, status=422)
        n = body.get("n") or 1
        echo = body.get("echo") is True
        usage = {"prompt_tokens": 5, "completion_tokens": 100, "total_tokens": 105} if word != "zero" else ZERO
        if prompts == [""]:  # truly no prompt tokens
            usage = {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"]}
        indexed = [(i * n + j, p) for i, p in enumerate(prompts) for j in range(n)]
        if not body.get("stream"):
            choices = [
                {"text": (p if echo else "") + ANSWER, "index": k, "logprobs": None, "finish_reason": "length"}
                for k, p in indexed
            ]
            out = {**base, "choices": choices, **({"usage": usage} if word != "nousage" else {})}
            return web.json_response(out)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k, p in indexed:
            for text in ([p] if echo else []) + [" ok"] * 3:
                await resp.write(_sse({**base, "choices": [{"text": text, "index": k, "finish_reason": None}]}))
            await resp.write(_sse({**base, "choices": [{"text": "", "index": k, "finish_reason": "length"}]}))
        if (body.get("stream_options") or {}).get("include_usage") and word != "nousage":
            await resp.write(_sse({**base, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        msg = {"role": "assistant", "content": "hi there"}
        choice = {"index": 0, "message": msg, "finish_reason": "stop"}
        out = {"id": "c", "object": "chat.completion", "created": 1, "model": body["model"], "choices": [choice]}
        return web.json_response({**out, "usage": ZERO})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(len(body["input"]))]
        return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": ZERO})

    async def messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {
                "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                "content": [{"type": "text", "text": "hi there"}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
        )  # fmt: skip


@pytest.fixture
async def proxy(start_proxy: Any, serve_routes: ServeRoutes) -> Any:
    up = Careless()
    server = await serve_routes(
        web.post("/v1/completions", up.completions),
        web.post("/v1/chat/completions", up.chat),
        web.post("/v1/embeddings", up.embeddings),
        web.post("/v1/messages", up.messages),
    )
    price = {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
    cfg = {
        "providers": {
            "p": {"kind": "openai_compatible", "base_url": server.url + "/v1", "api_key": "k"},
            "a": {"kind": "anthropic", "base_url": server.url, "api_key": "k"},
        },
        "deployments": {
            "d": {"provider": "p", "model": "x", "price": price},
            "c": {"provider": "a", "model": "y", "price": price},
        },
        "models": {"m": {"deployments": ["d"]}, "claude": {"deployments": ["c"]}},
    }
    got = await start_proxy(cfg)
    got.upstream = up
    return got


async def _record(proxy: Any, count: int) -> Any:
    """The request's record, the `count`th written."""

    async def written() -> Any:
        return proxy.recorder.records[count - 1] if len(proxy.recorder.records) >= count else None

    return await eventually(written, "the request's record")


def _client(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)


async def test_a_streamed_completion_is_priced_by_the_upstreams_usage(proxy: Any) -> None:
    # Was: asked without `stream_options`, every stream was priced by edgeroute's count of it.
    client = _client(proxy)
    text, usages = "", []
    async for chunk in await client.completions.create(model="m", prompt="go", max_tokens=50, stream=True):
        text += "".join(c.text for c in chunk.choices)
        usages.append(chunk.usage)
    assert text == " ok ok ok" and usages and all(u is None for u in usages)  # not asked: none shown
    assert proxy.upstream.bodies[-1]["stream_options"] == {"include_usage": True}
    rec = await _record(proxy, 1)
    assert rec.usage is not None and not rec.usage.estimated
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (5, 100)
    assert rec.cost_usd == pytest.approx(105 / 1e6)

    # Asked for: shown, and the same.
    stream = await client.completions.create(
        model="m", prompt="go", max_tokens=50, stream=True, stream_options={"include_usage": True}
    )
    shown = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert [(u.prompt_tokens, u.completion_tokens) for u in shown] == [(5, 100)]
    assert (await _record(proxy, 2)).usage.completion_tokens == 100

    # An upstream that refuses the field is asked again without it, and the stream counted.
    text = ""
    async for chunk in await client.completions.create(model="m", prompt="strict go", max_tokens=50, stream=True):
        text += "".join(c.text for c in chunk.choices)
    assert text == " ok ok ok" and "stream_options" not in proxy.upstream.bodies[-1]
    rec = await _record(proxy, 3)
    assert rec.status == 200 and rec.usage.estimated and rec.usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("stream", "extra", "answers"),
    [
        (False, {}, 1),
        (False, {"n": 2}, 2),
        (False, {"best_of": 3}, 1),  # the best one of three returned: one echo
        (True, {}, 1),
        (True, {"n": 2}, 2),
    ],
)
async def test_an_echoed_prompt_is_no_output(proxy: Any, stream: bool, extra: dict[str, Any], answers: int) -> None:
    # Was: counted by edgeroute (no usage reported), each echoed prompt was output: 602 + 605 tokens.
    client = _client(proxy)
    prompt = "nousage " + PROMPT
    if stream:
        got = ""
        async for chunk in await client.completions.create(
            # The echo is no overrun: the output cap lets the echoed prompts through beside max_tokens.
            model="m",
            prompt=prompt,
            max_tokens=3,
            echo=True,
            stream=True,
            extra_body=extra,
        ):
            got += "".join(c.text for c in chunk.choices)
    else:
        answer = await client.completions.create(model="m", prompt=prompt, max_tokens=3, echo=True, extra_body=extra)
        got = "".join(c.text for c in answer.choices)
    assert got == (prompt + ANSWER) * answers  # the client gets the echo
    rec = await _record(proxy, 1)
    prompt_tokens = _core.Router.count_tokens(prompt, "o200k_base")
    assert rec.usage.estimated and rec.usage.prompt_tokens == prompt_tokens > 500
    assert rec.usage.completion_tokens == 3 * answers
    assert rec.error_class is None  # nor an upstream past its max_tokens (JSON: 3 asked for)


async def test_usage_of_no_prompt_tokens_is_counted(proxy: Any) -> None:
    # Was: taken as said, a non-empty prompt cost $0 and drew on no budget.
    client = _client(proxy)
    words = "zero a long prompt with many words in it"
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": words}])
    await client.embeddings.create(model="m", input=[words, "b"])
    await client.completions.create(model="m", prompt=words)
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="x", max_retries=0)
    await claude.messages.create(model="claude", max_tokens=50, messages=[{"role": "user", "content": words}])
    for i, endpoint in enumerate(("chat", "embeddings", "completions", "messages")):
        rec = await _record(proxy, i + 1)
        assert rec.status == 200, endpoint
        assert rec.usage.estimated and rec.usage.prompt_tokens >= 9, endpoint
        assert rec.cost_usd > 0, endpoint
        if endpoint != "embeddings":
            assert rec.usage.completion_tokens > 0, endpoint  # "hi there" / " ok ok ok"


async def test_an_empty_prompt_keeps_its_zero(proxy: Any) -> None:
    answer = await _client(proxy).completions.create(model="m", prompt="", max_tokens=3)
    assert answer.choices[0].text == ANSWER
    rec = await _record(proxy, 1)
    assert not rec.usage.estimated and (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (0, 3)
