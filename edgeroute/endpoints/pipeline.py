"""One request's life on an endpoint other than chat: the same steps as chat, in the same order.

Read and check the body (the endpoint's own rules, its errors in OpenAI's format), let the
core decide on a chat-shaped *routing body* the endpoint derives from it (so models, rules,
keys, budgets and rate limits apply unchanged), dispatch with failover through the
endpoint's `Call`, answer JSON or relay a stream, and in every case record the request:
usage, cost, status, attempts, exactly once. An endpoint whose answer its request fully
determines (embeddings) names the fields that do, and is served from the response cache.
A generation endpoint's answered request is mirrored where its route has `shadow:` (as a
chat request is: `shadow`), its mirror parsed, decided and dispatched as the endpoint's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

import orjson
from aiohttp import web

from edgeroute import _core, headers, provider_files, shadow
from edgeroute.accounting import RequestRecord
from edgeroute.admission import ADMISSION, CACHE_MAY_ANSWER, Ticket, rerouted_model, with_model
from edgeroute.cache.service import CACHE, Plan, ResponseCache, answer_cost
from edgeroute.capacity import class_name
from edgeroute.config import Timeouts
from edgeroute.cost.keys import IDENTITY
from edgeroute.cost.media import Media
from edgeroute.dispatch import Call, Failure, JsonAnswer, StreamAnswer, relay_stream
from edgeroute.dispatch.attempt import PARSE_ON_LOOP_BYTES, error_in_200
from edgeroute.errors import ProxyError
from edgeroute.openai_api import (
    _cached_answer,
    _route_headers,
    _tenant,
    answered_headers,
    begin,
    client_left,
    decide_soon,
    finish,
    keep_content,
    route_cache,
    route_shadow,
    servable,
    unreadable_first,
    with_stored,
)
from edgeroute.outcome import Outcome
from edgeroute.providers.base import Adapter
from edgeroute.ready_response import ReadyResponse
from edgeroute.request_input import read_body, region_of, tags_of
from edgeroute.requestlog import content
from edgeroute.state import STATE, Live


@dataclass(frozen=True, slots=True)
class Stored:
    """What a request names that the provider keeps and bills as prompt tokens, though its text
    is not in the request (a continued conversation, a stored prompt): the decision counts it
    into the prompt, so that context windows, budgets and token rate limits see it."""

    tokens: int = 0  # sizes known (a conversation's input and output tokens as billed)
    unknown: int = 0  # references of unknown size: each taken to fill the context window


# Makes the dispatch of a checked request over the decision's deployments, in the endpoint's
# format: (live, decision, routing body the decision was made on, record, timeouts, max attempts).
MakeCall = Callable[[Live, _core.Decision, bytes, RequestRecord, Timeouts | None, int], Call]


@dataclass(frozen=True, slots=True)
class Parsed:
    """A checked request: what the core decides on, and how the endpoint dispatches it."""

    model: str
    routing_body: bytes  # a chat-completions body with the request's model and text (for rules)
    stream: bool
    call: MakeCall
    # Turns a relayed stream's bytes into what the client receives (None: as they are).
    encoder: Callable[[], Callable[[bytes], bytes]] | None = None
    # What determines the answer exactly, for the response cache (None: the endpoint is not cached).
    cache_fields: dict[str, Any] | None = None
    # The prompt's tokens sent as token ids (completions, embeddings): exact, and absent from
    # the routing body's text, so the decision (and admission, which reserves by it) counts them.
    token_ids: int = 0
    # The whole prompt, exactly, under an encoding, for a prompt the routing body's text does not
    # hold as it is billed: text and ids, or a completions suffix read with each of several prompts.
    count: Callable[[str], int] | None = None
    # Whether a public model has a deployment that can serve the request (None: every model
    # can), so that a budget's downgrade does not send it where it can only fail.
    serves: Callable[[Live, str], bool] | None = None
    # The text of a JSON answer, for the shadow log; None: the endpoint is not mirrored (`shadow:`).
    answer_text: Callable[[bytes], str | None] | None = None
    # Refuses a request that names what the caller may not use (another tenant's stored response),
    # and says what it names that the provider keeps and bills as prompt tokens.
    check: Callable[[web.Request, Live], Awaitable[Stored | None]] | None = None
    # Records what the answer gives the caller (a stored response's id), before it is sent.
    bind: Callable[[web.Request, Live, JsonAnswer | StreamAnswer], Awaitable[None]] | None = None
    # Records what a stream gave the caller as it went (a code execution container), before its end.
    after_stream: Callable[[web.Request, Live, StreamAnswer], Awaitable[None]] | None = None
    # Its image, audio and file parts, which budgets reserve for (None: it has none).
    media: Media | None = None


# An endpoint: checks the client's body (a `ProxyError` 400 naming what is wrong) and says how to serve it.
Endpoint = Callable[[bytes], Parsed]


class Countable(Protocol):
    def tokens(self, encoding: str) -> int: ...


class CountedCall(Call):
    """A dispatch whose prompt is counted from the endpoint's own request (when the upstream reports no usage)."""

    def usage_body(self) -> bytes | None:
        """None: not bounded (`Attempts.usage_body`). Embeddings and completions prompts may be
        token ids, and `best_of`, `echo` and suffixes bill beyond what the routing body shows."""
        return None

    def __init__(self, req: Countable, *args: Any) -> None:
        super().__init__(*args)
        self._req = req

    def count_prompt(self) -> int:
        return self._req.tokens(self.decision.encoding)


def _plan(request: web.Request, live: Live, decision: _core.Decision, parsed: Parsed, rid: str) -> Plan | None:
    """The cache's plan for the request `rid` (None: not cached; an endpoint never cached still
    answers its cache header: 400 for a bad value, 504 for `only-if-cached`). What it stores
    names `rid`, so that a hit's record says whose answer it served, as on chat."""
    if parsed.cache_fields is None:
        ResponseCache.never_cached(request)
        return None
    settings = route_cache(live.config, decision)
    tenant = _tenant(request, settings)
    return request.app[CACHE].plan_exact(request, settings, decision.route, parsed.cache_fields, tenant, rid)


def _same_model(request: web.Request, live: Live, decision: _core.Decision) -> dict[str, str]:
    """The deployments whose cached answer this request may get (`servable`: those it may be
    sent to, and the drained ones its rule allows) that serve the model its first choice
    serves (vectors of two embedding models do not compare)."""
    first = live.deployments[decision.order[0]].model
    return {
        name: what
        for name, what in servable(live, decision, region_of(request)).items()
        if live.deployments[live.index_of[name]].model == first
    }


def routing_body(
    model: str,
    text: str,
    stream: bool = False,
    max_tokens: int | None = None,
    choices: int = 1,
    include_usage: bool = False,
) -> bytes:
    """The chat body the core decides on: one user turn holding the request's text, so that
    rules (keywords, PII, token counts) see what the upstream will. `max_tokens` is what
    budgets and rate limits reserve for each answer (1 for embeddings, which produce none),
    `choices` how many answers the upstream writes (and bills), and `include_usage` whether the
    client asked for a stream's usage chunk (`stream_options`: the decision's `include_usage`)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if choices > 1:
        body["n"] = choices
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


_U32 = 2**32 - 1  # the core counts in 32 bits
_OFF_LOOP_CHARS = 16 * 1024  # text counted exactly in a worker thread past this


def _ids_only(parsed: Parsed) -> int | None:
    """The prompt's exact count when it is all token ids (no text to count): None otherwise."""
    return min(parsed.token_ids, _U32) if parsed.token_ids and parsed.count is None else None


async def _with_ids(parsed: Parsed, decision: _core.Decision) -> int | None:
    """A prompt with an exact count (`Parsed.count`: text and token ids, a suffix read with each
    prompt) counted under the decision's encoding (its text off the loop when long); None for any
    other prompt (the first decision counted it)."""
    if parsed.count is None:
        return None
    if len(parsed.routing_body) < _OFF_LOOP_CHARS:
        return min(parsed.count(decision.encoding), _U32)
    return min(await asyncio.to_thread(parsed.count, decision.encoding), _U32)


async def _with_stored(
    live: Live, body: bytes, route_body: bytes, request: web.Request, decision: _core.Decision, stored: Stored
) -> _core.Decision:
    """The decision again, its prompt counted with the stored state the request names (`Stored`,
    see `with_stored`)."""
    return await with_stored(live, body, route_body, request, decision, stored.tokens, stored.unknown)


def policy_body(route_body: bytes, sent: bytes) -> bytes:
    """`route_body` with the client's body `sent` as the value of a key the core does not
    read, for the decision: a deployment that speaks the endpoint gets `sent` as it is, and
    the PII rule reads every string of the body it decides on, so personal data the routing
    body leaves out (a completions `suffix`, the `tools` of a Responses request without a chat
    translation, a thinking block passed through to Anthropic) still keeps the request to the
    deployments allowed it. Appended last, so the decision's `model_span` holds for
    `route_body` (an object from `orjson.dumps`, never empty)."""
    return route_body[:-1] + b',"edgeroute_client_body":' + sent + b"}"


def _side_effect_skip(request: web.Request, rec: RequestRecord, call: Call, percent: float) -> bool:
    """Whether the request has side effects upstream (`side_effects`): its mirror would run them
    again at the candidate, so it is not sent; a sampled one is counted and logged as skipped."""
    what = call.side_effect()
    if what is None:
        return False
    mirrors = request.app.get(shadow.MIRRORS)
    if mirrors is not None and shadow.sampled(percent):
        mirrors.skip(rec.route or "", "side_effects", f"the request has side effects upstream ({what})")
    return True


def _mirror_of(endpoint: Endpoint, text: Callable[[bytes], str | None]) -> shadow.Prepare:
    """How a mirror of a request on `endpoint` is made from its shadow body: parsed and checked
    as the client's was, decided on its routing body (as `serve` decides), dispatched by the
    endpoint's `Call` (which speaks the deployment's format)."""

    def prepare(body: bytes) -> shadow.Mirror:
        parsed = endpoint(body)
        route_body = parsed.routing_body

        def call(live: Live, d: _core.Decision, rec: RequestRecord, timeouts: Timeouts | None, attempts: int) -> Call:
            return parsed.call(live, d, route_body, rec, timeouts, attempts)

        return shadow.Mirror(policy_body(route_body, body), call, text, _ids_only(parsed))

    return prepare


# The error rules every adapter starts from (`Adapter.judge`), for a caller that names none.
_GENERIC = Adapter("upstream", cast(Any, None), None)


def answer_object(data: bytes, status: int, key: str, adapter: Adapter | None = None) -> dict[str, Any] | Failure:
    """An upstream's JSON answer, which must be an object with a list of objects under `key`;
    else the failure (an item that is null or a string crashed the client's SDK on a 200). An
    error object in its place is classified by `adapter`'s rules as chat's is (`error_in_200`):
    as a server error, one client's invalid request was a 502 after every deployment was asked,
    and opened their circuits for everyone."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Failure(Outcome.SERVER_ERROR, status, "upstream sent malformed JSON")
    if isinstance(obj, dict) and (failed := error_in_200(adapter or _GENERIC, obj, status, (key,))) is not None:
        return failed
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        return Failure(Outcome.SERVER_ERROR, status, f"upstream answer has no {key}")
    if not all(isinstance(item, dict) for item in obj[key]):
        return Failure(Outcome.SERVER_ERROR, status, f"upstream answer has {key} that are not objects")
    return obj


def bad(message: str, param: str | None = None) -> ProxyError:
    """A 400 in OpenAI's format naming the offending parameter."""
    return ProxyError(400, message, code="invalid_request", param=param)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object with a non-empty string `model`."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad("We could not parse the JSON body of your request.") from None
    if not isinstance(req, dict):
        raise bad("The request body must be a JSON object.")
    if not isinstance(req.get("model"), str) or not req["model"]:
        raise bad("you must provide a model parameter", "model")
    return req


async def serve(
    request: web.Request, endpoint: Endpoint, answer: Callable[[bytes], bytes] | None = None
) -> web.StreamResponse:
    """Serves one request on `endpoint` (see the module's doc). `answer` rewrites a JSON answer
    before it is sent (the stored content is the upstream's)."""
    live, rec, started = begin(request)
    rid = rec.request_id
    admission = request.app[ADMISSION]
    ticket: Ticket | None = None
    reasons: list[str] = []
    try:
        body = await read_body(request)
        if live.config.server.provider_files == "refused" and live.access.keyed(request):
            await provider_files.refuse_named(body, request)
        # A body of megabytes (five million token ids) takes a second to parse and check: in a
        # worker thread, so the loop serves everyone else meanwhile (it takes the GIL back every 5 ms).
        parsed = await asyncio.to_thread(endpoint, body) if len(body) > PARSE_ON_LOOP_BYTES else endpoint(body)
        rec.model = parsed.model[:200]  # a client's unknown name is stored as asked: bounded
        stored = await parsed.check(request, live) if parsed.check is not None else None
        route_body = parsed.routing_body
        routed = policy_body(route_body, body)
        decision = await decide_soon(live, routed, request, prompt_tokens=_ids_only(parsed))
        if (exact := await _with_ids(parsed, decision)) is not None:
            decision = await decide_soon(live, routed, request, prompt_tokens=exact)
        if stored is not None and not (stored.tokens or stored.unknown):
            stored = None  # nothing stored named: decided once, as any request
        if stored is not None:
            decision = await _with_stored(live, routed, route_body, request, decision, stored)
        rec.route, rec.rule, rec.stream, rec.task = decision.route, decision.rule, parsed.stream, decision.task
        reasons = decision.reasons
        rec.reasons, rec.policy, rec.variant = reasons, decision.policy, decision.variant
        rec.tags = tags_of(request)
        # Budgets count the routing body exactly, off the loop, only when its bound alone would refuse.
        counted = route_body
        try:
            with request.app[STATE].cut_at_drain_end(rec):  # a store's slow answer: cut at the drain's end
                ticket = await admission.admit(
                    request,
                    decision,
                    rec,
                    lambda: asyncio.to_thread(live.router.count_prompt, counted),
                    partial(parsed.serves, live) if parsed.serves is not None else None,
                    parsed.media,
                )
        except ProxyError as e:
            await unreadable_first(e, lambda: parsed.call(live, decision, route_body, rec, None, 1))
            if e.code not in CACHE_MAY_ANSWER or (plan := _plan(request, live, decision, parsed, rid)) is None:
                raise
            entry = await request.app[CACHE].lookup(plan, _same_model(request, live, decision))
            if entry is None:
                raise
            rec.admission = None
            keep_content(live, rec, decision, body)
            return await _cached_answer(request, rec, decision, plan, entry, None)
        if (reroute := rerouted_model(ticket)) is not None:
            first = decision
            route_body = with_model(route_body, decision, reroute)
            # Exact, and more than the text: the ids, the stored state are not in it.
            known = decision.prompt_tokens if parsed.token_ids or stored is not None else None
            decision = await decide_soon(
                live, policy_body(route_body, body), request, rerouted=True, prompt_tokens=known
            )
            if decision.route != first.route and (plan := _plan(request, live, first, parsed, rid)) is not None:
                # As on chat: the cached answer of the route asked for, rather than paying another.
                if entry := await request.app[CACHE].lookup(plan, _same_model(request, live, first), False):
                    rec.admission = None
                    keep_content(live, rec, first, body)
                    return await _cached_answer(request, rec, first, plan, entry, None)
            rec.route, rec.rule = decision.route, decision.rule
            rec.policy, rec.variant = decision.policy, decision.variant  # the route that serves, not the one it left
            try:
                with request.app[STATE].cut_at_drain_end(rec):
                    await admission.rerouted(request, decision, ticket)
            except ProxyError as e:
                await unreadable_first(e, lambda: parsed.call(live, decision, route_body, rec, None, 1))
                raise
        rec.priority = class_name(live.classes, decision.priority)
        keep_content(live, rec, decision, body)
        model = live.config.models[decision.route]
        plan = _plan(request, live, decision, parsed, rid)
        if plan is not None and (entry := await request.app[CACHE].lookup(plan, _same_model(request, live, decision))):
            return await _cached_answer(request, rec, decision, plan, entry, None)
        call = parsed.call(live, decision, route_body, rec, model.timeouts, model.max_attempts)
        call.gate = admission.attempt_gate(ticket)
        try:
            got, dep = await call.run_until_drain(request.app[STATE])
        except ProxyError as e:
            if plan is not None and (stale := request.app[CACHE].serve_stale(plan, e)) is not None:
                return await _cached_answer(request, rec, decision, plan, stale, None, error=e)
            e.headers.update(_route_headers(rid, decision, None, rec))
            if plan is not None:
                e.headers[headers.CACHE] = plan.label
            raise
        rec.deployment = dep.name
        if parsed.bind is not None:
            try:
                await parsed.bind(request, live, got)
            except BaseException:  # the client gone meanwhile: a held stream gives back its slot and connection
                if isinstance(got, StreamAnswer):
                    call._discard(got, dep)
                raise
        hdrs = answered_headers(live, rid, decision, rec, call)
        rec.status = 200
        if plan is not None:
            hdrs[headers.CACHE] = rec.cache = plan.label
        mirrored = route_shadow(live.config, decision)  # a fresh answer only: never a cached one
        if mirrored is not None and _side_effect_skip(request, rec, call, mirrored.percent):
            mirrored = None
        if isinstance(got, JsonAnswer):
            cost = sum(a.cost_usd for a in rec.attempts)
            hdrs[headers.COST] = f"{cost:.8f}"
            if plan is not None:
                request.app[CACHE].save_json(plan, got.body, dep.cached_as, answer_cost(rec.attempts))
            if rec.content_mode != "none":
                rec.content_response = got.body
            if mirrored is not None and parsed.answer_text is not None and shadow.sampled(mirrored.percent):
                prepare = _mirror_of(endpoint, parsed.answer_text)
                ident, tags = request.get(IDENTITY), rec.tags
                shadow.start(request.app, live, mirrored, body, rec, got.body, ident, tags, prepare, parsed.answer_text)
            out = answer(got.body) if answer is not None else got.body
            return ReadyResponse(out, hdrs, "application/json")
        keep_stream = content.keep_stream(rec, None)
        if mirrored is not None and parsed.answer_text is not None:  # mirrored once the stream has ended cleanly
            prepare = _mirror_of(endpoint, parsed.answer_text)
            ident, tags = request.get(IDENTITY), rec.tags
            keep_stream = shadow.after_stream(request.app, live, mirrored, body, rec, ident, tags, prepare, keep_stream)
        encode = parsed.encoder() if parsed.encoder is not None else None
        if parsed.after_stream is not None:
            got.before_end = partial(parsed.after_stream, request, live, got)
        return await relay_stream(request, got, hdrs, call.timeouts.idle, call, dep, encode, keep_stream)
    except ProxyError as e:
        rec.status = e.status
        rec.error_class = rec.error_class or e.code or e.type
        e.headers.setdefault(headers.REQUEST_ID, rid)
        if rec.correlation_id is not None:
            e.headers.setdefault(headers.CORRELATION_ID, rec.correlation_id)
        raise
    except asyncio.CancelledError:
        client_left(request, rec)
        raise
    finally:
        finish(request, live, rec, started, ticket, reasons)
