"""`POST /v1/completions`: OpenAI's legacy text completions, passed through.

Served by OpenAI, Azure and OpenAI-compatible deployments (vLLM, Ollama, ... serve it);
other providers get a 400 naming the deployment. JSON and streams (ending with `[DONE]`)
pass through unchanged but for `model`; a stream is held until its first text, so an
upstream failing before it fails over. Usage is the upstream's (a stream asks for it, as a
chat stream does, and the client gets it only if it asked), else counted: without the prompt
that `echo` repeats in each answer, which is no output.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core, sse
from edgeroute.accounting import AttemptRecord, Usage
from edgeroute.cost import underreport
from edgeroute.dispatch import Failure, JsonAnswer, StreamAnswer
from edgeroute.dispatch.attempt import openai_usage, sound_usage
from edgeroute.endpoints.pipeline import CountedCall, Parsed, answer_object, bad, json_object, routing_body, serve
from edgeroute.endpoints.upstream import openai_request
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome
from edgeroute.providers.base import Adapter, UpstreamRequest
from edgeroute.upstream import DeploymentInfo
from edgeroute.upstream_http.response import Response

_TOKEN_MAX = 1 << 32  # token ids are non-negative 32-bit integers


def _tokens(values: list[Any]) -> bool:
    return all(type(t) is int and 0 <= t < _TOKEN_MAX for t in values)


def _prompt_texts(raw: Any) -> list[str | list[int]]:
    """The prompt as a list of strings or token lists (OpenAI accepts each shape)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if _tokens(raw):
            return [raw]
        if all(isinstance(p, str) for p in raw):
            return list(raw)
        if all(isinstance(p, list) and p and _tokens(p) for p in raw):
            return list(raw)
    raise bad(
        "'prompt' must be a string, an array of strings, or an array of tokens (or of token arrays);"
        " a token is an integer from 0 to 4294967295.",
        "prompt",
    )


class CompletionsRequest:
    def __init__(self, body: bytes) -> None:
        req = json_object(body)
        if "prompt" not in req:
            raise bad("Missing required parameter: 'prompt'.", "prompt")
        stream = req.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad("'stream' must be a boolean.", "stream")
        for name in ("max_tokens", "n", "best_of", "logprobs"):
            v = req.get(name)
            if v is not None and (type(v) is not int or v < 0):
                raise bad(f"'{name}' must be a non-negative integer.", name)
        suffix = req.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise bad("'suffix' must be a string.", "suffix")
        # The text after the insertion: read (and billed) with each prompt.
        self.suffix: str = suffix or ""
        self.echo = req.get("echo") is True
        self.n: int = req.get("n") or 1  # the answers to each prompt returned (`best_of` are written)
        opts = req.get("stream_options")
        self.wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        self.model: str = req["model"]
        self.prompts = _prompt_texts(req["prompt"])
        self.stream = bool(stream)
        self.max_tokens: int | None = req.get("max_tokens")
        # Every completion is written and billed: `n` (or `best_of`, the larger) of each prompt.
        each = max(req.get("n") or 1, req.get("best_of") or 1)
        self.choices = min(len(self.prompts) * each, 2**32 - 1)  # the core reads a u32 (past it: 1)
        self.body = req

    def text(self) -> str:
        """The prompts' text and the suffix (once: `tokens` counts it with each prompt)."""
        return "\n".join([*(p for p in self.prompts if isinstance(p, str)), *([self.suffix] if self.suffix else [])])

    def tokens(self, encoding: str) -> int:
        return self._suffix_tokens(encoding) + sum(
            len(p) if isinstance(p, list) else _core.Router.count_tokens(p, encoding) for p in self.prompts
        )

    def _suffix_tokens(self, encoding: str) -> int:
        return _core.Router.count_tokens(self.suffix, encoding) * len(self.prompts) if self.suffix else 0

    @property
    def empty(self) -> bool:
        """Whether the prompt is "" (a usage's prompt count of 0 is then its own)."""
        return not self.suffix and all(p == "" for p in self.prompts)

    def answered(self, choices: list[Any]) -> str:
        """What the model wrote in `choices`, joined: each choice's text, without the prompt
        `echo` repeats at its start. A text that does not start with its prompt's (an upstream
        that ignores `echo`; a prompt of token ids, whose text is not known here) is counted
        whole: no answer is taken for an echo it does not hold."""
        out = []
        for i, c in enumerate(choices):
            text = c.get("text") if isinstance(c, dict) else None
            if not isinstance(text, str):
                continue
            at = c.get("index") if type(c.get("index")) is int else i
            prompt = self.prompts[min(at // max(self.n, 1), len(self.prompts) - 1)] if self.echo else ""
            out.append(text[len(prompt) :] if isinstance(prompt, str) and text.startswith(prompt) else text)
        return "".join(out)

    def echoes(self, head: bytes) -> bool:
        """Whether a stream echoes its prompt: its first choice's first text (in the events held
        before the stream is relayed) starts the prompt, or starts with it. A text prompt only
        (the text of token ids is not known here); an upstream that ignores `echo` starts with
        its answer."""
        first = self.prompts[0]
        if not self.echo or not isinstance(first, str):
            return False
        for ev in sse.EventSplitter().feed(head if head.endswith(b"\n\n") else head + b"\n\n"):
            data = sse.event_data(ev)
            try:
                obj = orjson.loads(data) if data and data != b"[DONE]" else None
            except orjson.JSONDecodeError:
                continue
            for c in obj.get("choices") or () if isinstance(obj, dict) else ():
                text = c.get("text") if isinstance(c, dict) and c.get("index", 0) == 0 else None
                if isinstance(text, str) and text:
                    return first.startswith(text) or text.startswith(first)
        return False

    def echoed(self, prompt_tokens: int, encoding: str) -> int:
        """The tokens of the prompts (`prompt_tokens` of them, with the suffix) that `echo`
        repeats at the start of each answer: each prompt in each of its `n` answers."""
        return self.n * max(0, prompt_tokens - self._suffix_tokens(encoding)) if self.echo else 0


def _unreadable_choices(choices: list[dict[str, Any]]) -> str | None:
    """What makes a completions answer's choices not a completions client's, or None: a choice
    without `text` (a chat server's `chat.completion`, `text: null`) or with an `index` that is
    no integer. Relayed, the client's `choices[0].text` was None on a 200, billed as served."""
    for c in choices:
        if not isinstance(c.get("text"), str):
            return "a choice without text (a chat answer?)" if "message" in c else "a choice whose text is not a string"
        if "index" in c and type(c["index"]) is not int:
            return "a choice whose index is not an integer"
    return None


class CompletionsCall(CountedCall):
    text_chunks = True  # a chat chunk in its stream is the upstream's protocol error

    def __init__(self, req: CompletionsRequest, *args: Any) -> None:
        super().__init__(req, *args)
        self.req = req
        self._counted: list[Usage] = []  # the answers' usages counted here, echo left out already
        self._stream_echoes = False  # whether the stream relayed starts with its prompt (`echo`)

    def upstream_request(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        body = self.req.body
        if self.req.stream and not self.req.wants_usage and "stream_options" not in getattr(adapter, "unsupported", ()):
            # As a chat stream is (`Attempts.upstream_request`): counted from its text instead,
            # every stream was priced by edgeroute's estimate. The relay keeps the usage from
            # the client; an upstream that refuses the field is asked again without it.
            opts = body.get("stream_options")
            body = {**body, "stream_options": {**(opts if isinstance(opts, dict) else {}), "include_usage": True}}
            self.usage_added = True
        return openai_request(adapter, dep, "/completions", body, self.req.stream)

    def _json_answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        obj = answer_object(data, status, "choices", adapter)
        if isinstance(obj, Failure):
            return obj
        if (unreadable := _unreadable_choices(obj["choices"])) is not None:
            return Failure(Outcome.SERVER_ERROR, status, f"upstream answer has {unreadable}")
        said = sound_usage(obj)  # as chat's: a count no answer has is not the client's to see
        usage = Usage.from_openai(obj.get("usage"), answered=True, prompted=not self.req.empty)
        choices = obj["choices"] if isinstance(obj["choices"], list) else []
        if usage is None:
            text = self.req.answered(choices)
            done = _core.Router.count_tokens(text, self.decision.encoding) if text else 0
            usage = Usage(self.prompt_tokens(), done, estimated=True)
            self._counted.append(usage)
        elif underreport.impossible(usage.completion_tokens, len(data)):  # the body bounds its text
            fix = underreport.check(usage, self.req.answered(choices), self.decision.encoding)
            usage = self.charged(usage, fix, f"provider {adapter.name}")
        if said == "absurd":  # the count it is charged at, in its place
            obj["usage"] = openai_usage(usage)
        if said != "sound":
            data = orjson.dumps(obj)
        if len(choices) > (asked := len(self.req.prompts) * self.req.n):
            # More answers than asked for (`n` of each prompt): billed, but not the client's to
            # get (a stream relays those asked for alone).
            obj["choices"] = choices[:asked]
            data = orjson.dumps(obj)
        return JsonAnswer(data, usage)

    async def _hold_stream(self, resp: Response, adapter: Any) -> StreamAnswer | Failure:
        got = await super()._hold_stream(resp, adapter)
        if isinstance(got, StreamAnswer):  # the stream relayed: whether its count holds an echo
            self._stream_echoes = self.req.echoes(got.head)
        return got

    def output_allowance(self) -> int:
        """The echoed prompts are in the stream's text beside the answers: past `max_tokens`, not an overrun."""
        return self.req.echoed(self.prompt_tokens(), self.decision.encoding) if self.req.echo else 0

    def settle_attempt(self, rec: AttemptRecord, dep: DeploymentInfo, usage: Usage | None) -> None:
        """A completion counted from text elsewhere (a stream's, a cut answer's) holds the echoed
        prompts too: left out, as `_json_answer` leaves them (a 602-token prompt echoed with a
        3-token answer was billed 605 output tokens), when the stream starts with its prompt
        (`echoes`): one that does not was counted as no output. In place, once: what checks the
        usage against `max_tokens` after it is settled reads it so."""
        if usage is not None and usage.estimated and self._stream_echoes and not any(u is usage for u in self._counted):
            echoed = self.req.echoed(usage.prompt_tokens, self.decision.encoding)
            usage.completion_tokens = max(0, usage.completion_tokens - echoed)
            self._counted.append(usage)
        super().settle_attempt(rec, dep, usage)

    def has_content(self, obj: Any) -> bool:
        """Text or a finish commits the stream; usage alone does not (as `attempt.has_content`)."""
        if isinstance(obj, dict):
            for c in obj.get("choices") or ():
                if isinstance(c, dict) and (c.get("text") or c.get("finish_reason")):
                    return True
        return False


def answer_text(body: bytes) -> str | None:
    """The text of a completions answer (its choices', joined), for the shadow log."""
    try:
        choices = orjson.loads(body)["choices"]
        return "".join(c["text"] for c in choices if isinstance(c, dict) and isinstance(c.get("text"), str))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def parse(body: bytes) -> Parsed:
    req = CompletionsRequest(body)
    # The client's `include_usage` is the decision's: a stream made of a JSON answer ends with its usage.
    route = routing_body(req.model, req.text(), req.stream, req.max_tokens or None, req.choices, req.wants_usage)
    ids = sum(len(p) for p in req.prompts if isinstance(p, list))  # a prompt is all text or all ids
    # The routing text holds the suffix once: several prompts, or ids, are counted exactly with it.
    count = req.tokens if req.suffix and (ids or len(req.prompts) > 1) else None
    return Parsed(
        req.model, route, req.stream, partial(CompletionsCall, req), token_ids=ids, count=count, answer_text=answer_text
    )


async def handle(request: web.Request) -> web.StreamResponse:
    try:
        return await serve(request, parse)
    except ProxyError as e:
        if e.code == "context_length_exceeded":
            e.param = "prompt"  # a legacy completion's input (chat's error names `messages`)
        raise
