"""`POST /v1/responses`: OpenAI's Responses API, routed like chat.

A deployment whose provider speaks Responses (`kind: openai`, or `options.responses: true`
on another OpenAI-format provider) gets the request as is, `model` rewritten, and its
answer and stream events are relayed unchanged. Any other deployment is served through
chat (`responses_format`): the request translated, the answer and the stream turned
into a Response and its events. Failover works across both kinds before the first event.
The core decides on the chat translation (when the request has one), so rules see the
conversation; a request only a Responses upstream can serve is decided on its text.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core, service_tiers
from edgeroute.accounting import Usage, responses_tool_calls
from edgeroute.cost import underreport
from edgeroute.cost.media import items_media
from edgeroute.cost.prices import reachable_deployments
from edgeroute.cost.tool_calls import responses_tools, with_tools
from edgeroute.dispatch import Call, Failure, JsonAnswer, StreamAnswer, side_effects
from edgeroute.endpoints import container_owners as containers
from edgeroute.endpoints import responses_format as rf
from edgeroute.endpoints import responses_owners as owners
from edgeroute.endpoints import responses_params
from edgeroute.endpoints.pipeline import Parsed, Stored, answer_object, bad, json_object, routing_body, serve
from edgeroute.endpoints.responses_events import stream_of_response
from edgeroute.endpoints.responses_stream import ChatToResponses, ClientEncoder, NativeStream, has_content
from edgeroute.endpoints.upstream import openai_request, speaks_openai
from edgeroute.errors import ProxyError
from edgeroute.providers.base import Adapter, StreamTranslator, UpstreamRequest
from edgeroute.state import Live
from edgeroute.upstream import DeploymentInfo
from edgeroute.upstream_http.response import Response


def speaks_responses(adapter: Adapter) -> bool:
    if not speaks_openai(adapter):
        return False
    return bool(adapter.provider.options.get("responses", adapter.provider.kind == "openai"))


class ResponsesRequest:
    def __init__(self, body: bytes) -> None:
        req = json_object(body)
        if req.get("input") is None:
            raise bad("Missing required parameter: 'input'.", "input")
        responses_params.check(req)
        stream = req.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise bad("'stream' must be a boolean.", "stream")
        if req.get("background"):
            # Answered at once (queued, no usage) and run by the provider afterwards: its cost is
            # known to no one here, and was priced as its prompt (a budget escape).
            raise bad("Background responses are not supported through edgeroute.", "background")
        mot = req.get("max_output_tokens")
        if mot is not None and (type(mot) is not int or mot < 1):
            raise bad("'max_output_tokens' must be a positive integer.", "max_output_tokens")
        self.raw = req
        self.model: str = req["model"]
        self.stream = bool(stream)
        # The chat translation, or why there is none (served then only by Responses upstreams).
        self.chat: dict[str, Any] | None = None
        self.why_not: ProxyError | None = None
        try:
            self.chat = rf.to_chat(req)
        except ProxyError as e:
            self.why_not = e

    def text(self) -> str:
        """What the model reads, for a request without a chat translation: the instructions and
        the tools' definitions beside the input (the provider bills them as prompt tokens; the
        input alone let a long system prompt pass a budget unreserved)."""
        raw = self.raw.get("input")
        parts = [raw if isinstance(raw, str) else orjson.dumps(raw).decode()]
        instructions = self.raw.get("instructions")
        if isinstance(instructions, str):
            parts.insert(0, instructions)
        if self.raw.get("tools"):
            parts.append(orjson.dumps(self.raw["tools"]).decode())
        return "\n".join(parts)


class Via:
    """An adapter as `Attempts._hold_stream` sees it: this endpoint's translator for the stream,
    and the deployment's adapter for the rest (an error before content is classified by its
    rules, `in_band_failure`: without them every such error crashed into a failover storm)."""

    passthrough = False

    def __init__(self, translator: StreamTranslator, adapter: Adapter) -> None:
        self.translator = translator
        self.adapter = adapter

    def stream_translator(self, model: str, include_usage: bool = False) -> StreamTranslator:
        return self.translator

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)


class ResponsesCall(Call):
    def usage_body(self) -> bytes | None:
        return orjson.dumps(self.req.raw)  # the client's request (`Attempts.usage_body`)

    def __init__(self, req: ResponsesRequest, *args: Any) -> None:
        super().__init__(*args)
        self.req = req

    def find_side_effect(self) -> str | None:
        return side_effects.responses(self.req.raw)

    def upstream_request(self, adapter: Adapter, dep: DeploymentInfo) -> UpstreamRequest:
        if speaks_responses(adapter):
            return openai_request(adapter, dep, "/responses", self.req.raw, self.req.stream)
        if self.req.why_not is not None:
            e = self.req.why_not
            raise ProxyError(
                400, f"{e.message} The deployment `{dep.name}` speaks only chat.", code=e.code, param=e.param
            )
        return super().upstream_request(adapter, dep)

    def _json_answer(self, data: bytes, adapter: Any, status: int) -> JsonAnswer | Failure:
        if not speaks_responses(adapter):
            got = super()._json_answer(data, adapter, status)
            if isinstance(got, JsonAnswer):
                chat = orjson.loads(got.body)
                if got.usage is not None and got.usage.estimated:
                    # None reported, or unreadable: the Response gives the count it is charged at (as
                    # a stream's does); it said 0 tokens, and a count it could not read failed it.
                    chat["usage"] = rf.chat_usage(got.usage)
                got.body = orjson.dumps(rf.from_chat(self.req.raw, chat))
            return got
        obj = answer_object(data, status, "output", adapter)
        if isinstance(obj, Failure):
            return obj
        usage = Usage.from_openai(rf.usage_to_chat(obj.get("usage")), answered=True)
        if usage is None:  # none reported, or no output count: the answer is counted from its output
            text = rf.output_text(obj.get("output"))
            done = _core.Router.count_tokens(text, self.decision.encoding) if text else 0
            usage = Usage(self.prompt_tokens(), done, estimated=True)
        elif underreport.impossible(usage.completion_tokens, len(data)):  # the body bounds its text
            # As a chat answer's: more text than the reported output can be is charged as counted.
            fix = underreport.check(usage, rf.output_text(obj.get("output")), self.decision.encoding)
            usage = self.charged(usage, fix, f"provider {adapter.name}")
        if rf.absurd_usage(obj.get("usage")):  # as chat's: the client sees sound counts, or those charged
            obj["usage"] = rf.repaired_usage(obj["usage"]) or rf.usage_from_chat(rf.chat_usage(usage))
            data = orjson.dumps(obj)
        usage.tool_calls = responses_tool_calls(obj.get("output"))
        return JsonAnswer(data, usage, (data, obj))

    async def _hold_stream(self, resp: Response, adapter: Any) -> StreamAnswer | Failure:
        translator: StreamTranslator
        if speaks_responses(adapter):
            translator = NativeStream(bounded=self.req.raw.get("max_output_tokens") is not None)
        else:
            inner = None if adapter.passthrough else adapter.stream_translator(self.decision.model, True)
            bounded = self.req.raw.get("max_output_tokens") is not None
            translator = ChatToResponses(self.req.raw, inner, self._counted_usage, bounded)
        return await super()._hold_stream(resp, Via(translator, adapter))

    def stream_of(self, got: JsonAnswer) -> bytes | None:
        return stream_of_response(got.body)  # a chat upstream's answer, already a Response

    def _counted_usage(self, text: str) -> dict[str, Any]:
        done = _core.Router.count_tokens(text, self.decision.encoding) if text else 0
        return {"prompt_tokens": self.prompt_tokens(), "completion_tokens": done}

    def has_content(self, obj: Any) -> bool:
        return has_content(obj)

    def count_prompt(self) -> int:
        if self.req.chat is not None:
            return super().count_prompt()
        return _core.Router.count_tokens(self.req.text(), self.decision.encoding)


def served_natively(live: Live, model: str) -> bool:
    """Whether public model `model` reaches a deployment that speaks Responses (the only kind
    that serves a request without a chat translation)."""
    cfg = live.config
    return any(
        speaks_responses(live.upstreams[cfg.deployments[name].provider].adapter)
        for name in reachable_deployments(cfg, model)
    )


def answer_text(body: bytes) -> str | None:
    """The text of a Response (its output's), for the shadow log."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return rf.output_text(obj.get("output")) if isinstance(obj, dict) else None


def parse(body: bytes) -> Parsed:
    req = ResponsesRequest(body)
    serves = None
    if req.chat is not None:  # the chat translation: what chat deployments get, and what is counted
        route = orjson.dumps(req.chat)
    else:
        route = routing_body(req.model, req.text(), req.stream, req.raw.get("max_output_tokens"))
        serves = served_natively
    call = partial(ResponsesCall, req)
    return Parsed(
        req.model,
        route,
        req.stream,
        call,
        ClientEncoder,
        serves=serves,
        answer_text=answer_text,
        check=partial(_check, req.raw),
        bind=_bind,
        after_stream=_bind_stream,
        media=with_tools(
            items_media(req.raw.get("input")), responses_tools(req.raw.get("tools"), req.raw.get("max_tool_calls"))
        ),
    )


async def _check(raw: dict[str, Any], request: web.Request, live: Live) -> Stored:
    service_tiers.check(raw, live.config.server.service_tiers)
    stored = await owners.check(request, live, raw)
    for container, param in containers.responses_named(raw):
        await containers.check(request, live, container, param)
    return stored


def _size(usage: Usage | dict[str, Any] | None) -> int | None:
    """A conversation's size after an answer: its input and output tokens as billed (what a
    continuation of it is billed again as input); None when its usage is not known."""
    if isinstance(usage, Usage):
        return usage.prompt_tokens + usage.completion_tokens
    prompt, done = (usage.get(k) if usage is not None else None for k in ("prompt_tokens", "completion_tokens"))
    if type(prompt) is not int or prompt < 0:
        return None
    return prompt + (done if type(done) is int and done > 0 else 0)


async def _bind(request: web.Request, live: Live, got: JsonAnswer | StreamAnswer) -> None:
    """The answer's id (a stream's, from its first event) and a JSON answer's containers, bound
    before the client sees them; an answer is parsed for it only with tenants, and once."""
    if not live.access.keyed(request):
        if isinstance(got, JsonAnswer):
            got.read = None  # its reader's parsed object, held for this alone
        return
    if isinstance(got, StreamAnswer):
        await owners.bind(request, live, owners.stream_id(got.head))
        return
    obj = containers.json_answer(got)
    await owners.bind(request, live, owners.json_id(obj), containers.answer_containers(obj), _size(got.usage))


async def _bind_stream(request: web.Request, live: Live, got: StreamAnswer) -> None:
    if not live.access.keyed(request):
        return
    rid = owners.stream_id(got.head)
    if got.translator is None:
        # A whole Response served as its stream (`stream_of`): its events are all in its head.
        seen = NativeStream()
        seen.feed(got.head)
        await containers.bind(request, live, seen.containers)
        await owners.sized(request, live, rid, _size(seen.usage))
        return
    await containers.bind(request, live, containers.stream_containers(got))
    said = getattr(got.translator, "usage", None) or getattr(got.translator, "counted", None)  # reported, else ours
    await owners.sized(request, live, rid, _size(said))


async def handle(request: web.Request) -> web.StreamResponse:
    try:
        return await serve(request, parse)
    except ProxyError as e:
        if e.code == "context_length_exceeded":
            e.param = "input"  # a response's input, as OpenAI names it (chat's error names `messages`)
        raise
