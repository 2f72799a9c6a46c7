"""The OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/models`, `/v1/route/explain`."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from edgeroute import (
    _core,
    anthropic_models,
    audio_owners,
    free_requests,
    headers,
    provider_files,
    service_tiers,
    shadow,
    sticky,
)
from edgeroute.accounting import RequestRecord, billed_usage
from edgeroute.admission import ADMISSION, CACHE_MAY_ANSWER, Counter, Ticket, rerouted_model, with_model
from edgeroute.cache.entry import Entry, completion_from_stream
from edgeroute.cache.service import (
    CACHE,
    STALE_REASON,
    Plan,
    ResponseCache,
    answer_cost,
    rule_admits,
    stale_reason,
    tenant_of,
)
from edgeroute.cache.settings import RouteCache
from edgeroute.capacity import class_ceiling, class_name, request_class, spill_note
from edgeroute.config import Config, Model, Shadow
from edgeroute.cost import ledger_lock, prediction
from edgeroute.cost.keys import IDENTITY
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.media import audio_allowance, body_media, rule_of, with_parts
from edgeroute.dispatch import Call, JsonAnswer, relay_stream
from edgeroute.dispatch.attempt import COUNT_ON_LOOP_BYTES, body_with_usage
from edgeroute.errors import ProxyError
from edgeroute.governance.residency import check_asked_model, check_model, check_order, key_tags
from edgeroute.learning import LEARNER
from edgeroute.ready_response import ReadyResponse
from edgeroute.request_input import correlation_id, new_request_id, read_body, region_of, tags_of
from edgeroute.requestlog import content
from edgeroute.state import RECORDER, STATE, Live
from edgeroute.telemetry import app as telemetry
from edgeroute.telemetry import tracing
from edgeroute.telemetry.logs import bind_request

log = logging.getLogger(__name__)
_NAMED_PARAM = re.compile(r"Invalid (?:type|value) for '(\w+)'")
# The core's parse names no field of a wrong type ("invalid type: string "yes", expected a boolean").
_TYPE_ERROR = "The request body is not valid JSON for this endpoint: invalid type"
_TYPED = (("stream", bool, "a boolean"), ("max_tokens", int, "an integer"),
          ("max_completion_tokens", int, "an integer"), ("messages", list, "an array"),
          ("stream_options", dict, "an object"), ("user", str, "a string"))  # fmt: skip
_JSON_KINDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a decimal",
    str: "a string",
    list: "an array",
    dict: "an object",
}


def _wrong_type(body: bytes) -> ProxyError | None:
    """The 400 OpenAI gives for a field of the wrong type, naming it (`"stream": "yes"`,
    `"max_tokens": "5"`); None when the core's error was about another."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    for name, kind, expected in _TYPED if isinstance(req, dict) else ():
        value = req.get(name)
        if value is not None and type(value) is not kind:
            got = _JSON_KINDS.get(type(value), "another type")
            msg = f"Invalid type for '{name}': expected {expected}, but got {got} instead."
            return ProxyError(400, msg, code="invalid_type", param=name)
    return None


# Past this size the core's decision (parsing, rules and PII over the text: ~5 ns a byte, more
# with many pattern rules) costs more than a hop to a worker thread (~50 µs). The core releases
# the GIL for bodies of `_core.DETACH_FROM_BYTES` or more, so every decision made off the loop
# (this size, or `COUNT_ON_LOOP_BYTES` when counting exactly) lets the loop run meanwhile.
DECIDE_ON_LOOP_BYTES = 64 * 1024


async def decide_soon(live: Live, body: bytes, request: web.Request, **options: Any) -> _core.Decision:
    """`decide`, in a worker thread (the core decides with the GIL released) when the body is
    large, or when it counts a long body exactly (token-per-minute limits). On the event loop,
    ten clients sending 8 MB bodies stalled every other request for half a second."""
    if len(body) > DECIDE_ON_LOOP_BYTES or (live.exact_tokens and len(body) > COUNT_ON_LOOP_BYTES):
        return await asyncio.to_thread(decide, live, body, request, **options)
    return decide(live, body, request, **options)


# A reference of unknown size where no deployment of the route has a context window configured.
UNKNOWN_STORED_TOKENS = 128_000
_U32 = 2**32 - 1  # the core counts in 32 bits


def _window(live: Live, decision: _core.Decision) -> int:
    """The smallest context window configured among the deployments the decision may use (0: none)."""
    windows = [w for i in decision.order if (w := live.deployments[i].context_window) > 0]
    return min(windows, default=0)


async def with_stored(
    live: Live,
    body: bytes,
    counted: bytes,
    request: web.Request,
    decision: _core.Decision,
    tokens: int,
    unknown: int = 0,
) -> _core.Decision:
    """The decision on `body` again, its prompt counted with what the request names that the
    provider keeps and bills as prompt tokens, though it is not in the request (a stored
    conversation, a stored prompt, a spoken answer's audio): the request's own tokens exactly
    (`counted`: the chat body they are counted on), plus `tokens` known; each of `unknown`
    references of unknown size takes the prompt to the context window (no more can be billed
    as prompt), else adds `UNKNOWN_STORED_TOKENS`. Within a configured window, the total never
    passes it: a provider that truncates a long conversation bills no more. Context windows,
    budgets and token rate limits all see it."""
    own = decision.prompt_tokens
    if not decision.tokens_exact:
        own = await asyncio.to_thread(live.router.count_prompt, counted)
    room = (window := _window(live, decision)) - (decision.max_tokens or 0)
    total = own + tokens
    if window:
        total = min(total, max(room, own))
        if unknown:
            total = max(total, room)
    else:
        total += unknown * UNKNOWN_STORED_TOKENS
    return await decide_soon(live, body, request, prompt_tokens=min(total, _U32))


def audio_named_tokens(live: Live, decision: _core.Decision, named: audio_owners.Named) -> int:
    """The prompt tokens of the audio clips a chat request names by id: the sizes known, and a
    clip of unknown size at the audio allowance of the decision's deployments (`media_tokens.audio`)."""
    rule = rule_of(live.config.deployments[live.deployments[i].name] for i in decision.order)
    return named.tokens + audio_allowance(rule, named.unknown)


def decide(
    live: Live,
    body: bytes,
    request: web.Request,
    explain: bool = False,
    rerouted: bool = False,
    prompt_tokens: int | None = None,
) -> _core.Decision:
    """Asks the core; maps its errors onto the API's statuses. `rerouted`: decided again for the
    model admission named (a budget's downgrade): the key's `models` bound what its holder asks
    for, checked on the first decision; the operator's downgrade is not refused by them.
    `prompt_tokens`: the prompt's exact count, when the body's text is not all of it (token ids)."""
    ident = request.get(IDENTITY)  # a virtual key's team, role and user feed the rules
    # Feedback is attributed per (task, route): with learning on, every request is classified.
    explain = explain or live.config.learning.feedback is not None
    asked = request.headers.get(headers.PRIORITY)
    try:
        if ident is None:
            priority = request_class(asked, None, None, live.classes) if asked is not None else None
            return live.router.decide(
                body,
                tags=tags_of(request),
                explain=explain,
                exact_tokens=live.exact_tokens,
                priority=priority,
                prompt_tokens=prompt_tokens,
            )
        keyed = sticky.identity(live.config, live.experiment_salt, ident)  # its arm its key's, not the body's
        d = live.router.decide(
            body,
            tags=key_tags(ident, tags_of(request), live.regions),  # its denied tags refused, its region added
            team=ident.team,
            role=ident.role,
            **keyed,
            explain=explain,
            exact_tokens=live.exact_tokens,
            priority=request_class(asked, ident.priority, ident.priorities, live.classes),
            priority_ceiling=class_ceiling(ident.priority, ident.priorities, live.default_class, live.classes),
            prompt_tokens=prompt_tokens,
        )
        if not rerouted:
            check_model(ident, d.model)
        if ident.residency is not None:
            check_order(live.config, (live.deployments[i].name for i in d.order), ident.residency)
        return d
    except (_core.ContextLengthError, _core.ForbiddenError, _core.NoDeploymentError) as e:
        # Said of a model the core found: for one the key may not use, its 404 (a context
        # window's 400 told a held key another team's model exists, and its window).
        if ident is not None and not rerouted:
            check_asked_model(ident, body)
        if isinstance(e, _core.ContextLengthError):  # OpenAI's answer: a 5xx would have SDKs retry it in vain
            raise ProxyError(400, str(e), code="context_length_exceeded", param="messages") from None
        if isinstance(e, _core.ForbiddenError):
            raise ProxyError(403, str(e), code="request_refused_by_rule") from None
        raise ProxyError(503, str(e), code="no_deployment_available") from None
    except _core.BadRequestError as e:  # the body's own (ContextLengthError is one: above)
        if str(e).startswith(_TYPE_ERROR) and (wrong := _wrong_type(body)) is not None:
            raise wrong from None
        named = _NAMED_PARAM.match(str(e))  # "Invalid value for 'n': ..." names its field
        raise ProxyError(400, str(e), code="invalid_request", param=named[1] if named else None) from None
    except _core.UnknownModelError as e:
        raise ProxyError(404, str(e), code="model_not_found", param="model") from None


# Per config generation (the running one and the one before it): (variant, model, route) ->
# the models that chose that route. All three are names of the config's models, so few.
_CHOSEN_BY: dict[int, tuple[Config, dict[tuple[str | None, str, str], list[Model]]]] = {}


def _choosers(cfg: Config, d: _core.Decision) -> list[Model]:
    """`_find_choosers`, worked out once per config and (variant, model, route): each request
    of a policy or experiment asks for its cache and shadow settings (~5 µs each time)."""
    memo = _CHOSEN_BY.get(id(cfg))
    if memo is None or memo[0] is not cfg:
        if len(_CHOSEN_BY) >= 2:
            _CHOSEN_BY.clear()
        memo = _CHOSEN_BY[id(cfg)] = (cfg, {})
    key = (d.variant, d.model, d.route)
    if (got := memo[1].get(key)) is None:
        got = memo[1][key] = _find_choosers(cfg, *key)
    return got


def _find_choosers(cfg: Config, variant: str | None, model: str, route: str) -> list[Model]:
    """The models that chose `route`, nearest first: a policy route that is the experiment's
    variant, then the model the client asked for (an experiment or a policy)."""
    out = []
    for name in (variant, model):
        m = cfg.models.get(name) if name is not None and name != route else None
        if m is None or (m.experiment is None and m.policy is None):
            continue
        chose = [v.route for v in m.experiment.variants] if m.experiment else []
        chose += [c.route for c in m.policy.candidates] if m.policy else []
        chose += [c.route for r in chose if (p := cfg.models[r].policy) for c in p.candidates]
        if route in chose:  # not a route a rule sent the request to instead
            out.append(m)
    return out


def route_cache(cfg: Config, d: _core.Decision) -> RouteCache | None:
    """The cache settings for the route serving `d`: its own, else those of the model that chose
    it (an experiment's or a policy's `cache:` applies to the routes it chooses, each apart)."""
    own = cfg.models[d.route].cache
    if own is not None:
        return own
    return next((m.cache for m in _choosers(cfg, d) if m.cache is not None), None)


def route_shadow(cfg: Config, d: _core.Decision) -> Shadow | None:
    """The shadow settings for the route serving `d`: its own, else its chooser's (see `route_cache`)."""
    own = cfg.models[d.route].shadow
    if own is not None:
        return own
    return next((m.shadow for m in _choosers(cfg, d) if m.shadow is not None), None)


def explain_header(d: _core.Decision, note: str | None = None) -> str:
    """One header line: route, rule or policy and why, and the predictions when they were made;
    then `note` (why admission did not take a budget's action)."""
    parts = [f"route={d.route}", f"rule={d.rule or 'default'}", f"why={' & '.join(d.reasons)}"]
    if d.variant is not None:
        parts.append(f"variant={d.variant}")
    if d.policy is not None:
        parts.append(f"policy={d.policy}")
    if d.task is not None:
        parts.append(f"task={d.task}")
    if d.difficulty is not None:
        parts.append(f"difficulty={d.difficulty:.2f}")
    parts.append(f"tokens={d.prompt_tokens}")
    if note is not None:
        parts.append(note)
    # Header values must be latin-1: rule names and reasons come from the config and the prompt.
    line = "; ".join(parts)
    return line if line.isascii() else line.encode("latin-1", "replace").decode("latin-1")


@dataclass(frozen=True, slots=True)
class Dialect:
    """Another client API served by the chat pipeline (e.g. Anthropic's `/v1/messages`)."""

    read: Callable[[web.Request], Awaitable[bytes]]  # the client's request as an OpenAI-format body
    answer: Callable[[bytes], bytes]  # an OpenAI chat completion → the client's JSON answer
    stream: Callable[[], Callable[[bytes], bytes]]  # a new encoder: OpenAI SSE → the client's SSE


async def chat_completions(request: web.Request, dialect: Dialect | None = None) -> web.StreamResponse:
    app = request.app  # a property chain in aiohttp: read once
    live, rec, started = begin(request, app)
    rid = rec.request_id
    admission = app[ADMISSION]
    ticket: Ticket | None = None
    reasons: list[str] = []
    body: bytes | None = None
    plan: Plan | None = None
    try:
        body = await (dialect.read(request) if dialect else read_body(request))
        if live.config.server.provider_files == "refused" and live.access.keyed(request):
            await provider_files.refuse_named(body, request)
        # The request's tags and its key's region, read once (the headers and the key do not change).
        tags, region = tags_of(request), region_of(request)
        # With tenants, audio named by id is the caller's; the provider bills each reference as prompt.
        named = await audio_owners.check(request, live, body)
        decision = await decide_soon(live, body, request)
        if named is not None:
            decision = await with_stored(live, body, body, request, decision, audio_named_tokens(live, decision, named))
        if dialect is None:  # Anthropic's tiers (`auto`, `standard_only`) bill no premium
            service_tiers.check_raw(decision.service_tier, live.config.server.service_tiers)
        rec.model, rec.route, rec.rule, rec.stream = decision.model, decision.route, decision.rule, decision.stream
        rec.task = decision.task
        reasons = decision.reasons
        rec.reasons, rec.tags = reasons, tags
        rec.policy, rec.variant, rec.difficulty = decision.policy, decision.variant, decision.difficulty
        predicted = await prediction.tokens(decision)  # checked whether budgets count it or not
        cache = app[CACHE]
        model = live.config.models[decision.route]
        settings = route_cache(live.config, decision)
        plan = cache.plan(request, settings, decision.route, body, _tenant(request, settings), rec.request_id)
        cache.confine(plan, live.config, decision.rule, region)
        cache.prefetch(plan)  # a shared cache's round trip overlaps admission's
        try:
            with app[STATE].cut_at_drain_end(rec):  # a store's slow answer: cut at the drain's end
                ticket = await admission.admit(
                    request,
                    decision,
                    rec,
                    _counter(live, body),
                    media=with_parts(body_media(body, decision), prediction=predicted),
                )
        except ProxyError as e:
            await unreadable_first(e, partial(Call, live, decision, body, rec, model.timeouts, 1))
            if e.code not in CACHE_MAY_ANSWER or plan is None:
                raise
            entry = await cache.lookup(plan, servable(live, decision, region))
            if entry is None:
                raise
            rec.admission = None
            keep_content(live, rec, decision, body)
            return await _cached_answer(request, rec, decision, plan, entry, dialect)
        if (reroute := rerouted_model(ticket)) is not None:
            # A budget downgraded the request, or its deployment is at a provider limit: decide again.
            first = decision
            rerouted = with_model(body, decision, reroute)
            known = decision.prompt_tokens if named is not None else None  # its audio is not in the text
            decision = await decide_soon(live, rerouted, request, rerouted=True, prompt_tokens=known)
            if decision.route != first.route:
                # The cache's answer of the route asked for costs nothing and reaches no
                # provider: served rather than paying another route (as a spent budget lets a
                # hit through).
                if plan is not None and (entry := await cache.lookup(plan, servable(live, first, region), False)):
                    rec.admission = None
                    rec.priority = class_name(live.classes, first.priority)
                    keep_content(live, rec, first, body)
                    return await _cached_answer(request, rec, first, plan, entry, dialect)
                cache.discard(plan)
                model = live.config.models[decision.route]
                settings = route_cache(live.config, decision)
                plan = cache.plan(
                    request, settings, decision.route, rerouted, _tenant(request, settings), rec.request_id
                )
            body = rerouted
            rec.route, rec.rule = decision.route, decision.rule
            rec.policy, rec.variant = decision.policy, decision.variant  # the route that serves, not the one it left
            cache.confine(plan, live.config, decision.rule, region)
            try:
                with app[STATE].cut_at_drain_end(rec):
                    await admission.rerouted(request, decision, ticket)
            except ProxyError as e:
                await unreadable_first(e, partial(Call, live, decision, body, rec, model.timeouts, 1))
                raise
        rec.priority = class_name(live.classes, decision.priority)
        keep_content(live, rec, decision, body)
        if plan is not None:
            entry = await cache.lookup(plan, servable(live, decision, region))
            if entry is not None:
                if (data := await _rendered(entry, dialect, decision.stream, decision.include_usage)) is not None:
                    return await _cached_answer(request, rec, decision, plan, entry, dialect, data=data)
                cache.unusable(plan)
        call = Call(live, decision, body, rec, model.timeouts, model.max_attempts)
        call.gate = admission.attempt_gate(ticket)
        try:
            answer, dep = await call.run_until_drain(app[STATE])
        except ProxyError as e:
            if plan is not None and (stale := cache.serve_stale(plan, e)) is not None:
                return await _cached_answer(request, rec, decision, plan, stale, dialect, error=e)
            e.headers.update(_route_headers(rid, decision, None, rec))
            if plan is not None:
                e.headers[headers.CACHE] = plan.label
            raise
        rec.deployment = dep.name
        hdrs = answered_headers(live, rid, decision, rec, call)
        if plan is not None:
            hdrs[headers.CACHE] = rec.cache = plan.label
        if isinstance(answer, JsonAnswer):
            cost = sum(a.cost_usd for a in rec.attempts)
            hdrs[headers.COST] = f"{cost:.8f}"
            rec.status = 200
            if plan is not None:
                cache.save_json(plan, body_with_usage(answer), dep.cached_as, answer_cost(rec.attempts))
            if rec.content_mode != "none":
                rec.content_response = answer.body
            shadow.maybe_mirror(
                request.app,
                live,
                route_shadow(live.config, decision),
                body,
                decision,
                rec,
                answer.body,
                request.get(IDENTITY),
                tags,
                prompt_tokens=decision.prompt_tokens if named is not None else None,  # its audio is not in the text
            )
            if live.access.keyed(request):  # its audio is the caller's before its id is shown
                ids = audio_owners.answer_ids(answer.body)
                await audio_owners.bind(request, live, ids, audio_owners.clip_tokens(answer.usage) if ids else None)
            out = dialect.answer(answer.body) if dialect else answer.body
            return ReadyResponse(out, hdrs, "application/json")  # a 200 of bytes in hand: no general prepare
        rec.status = 200
        if live.access.keyed(request) and answer.translator is not None:  # its audio bound before its end
            seen = answer.translator = audio_owners.StreamAudio(answer.translator, answer.head)
            answer.before_end = partial(seen.bind, request, live)
        encode = dialect.stream() if dialect else None
        on_complete = _stream_saver(request, plan, dep.cached_as, rec) if plan is not None and plan.stores else None
        on_complete = content.keep_stream(rec, on_complete)
        if (mirrored := route_shadow(live.config, decision)) is not None:  # mirrored once the stream is whole
            known = decision.prompt_tokens if named is not None else None  # its audio is not in the text
            on_complete = _stream_mirror(request, live, mirrored, body, rec, on_complete, known)
        if (candidate := app.get(shadow.CANDIDATE_ROUTER)) is not None:  # sees the stream once complete
            on_complete = candidate.after_stream(live, body, decision, rec, request.get(IDENTITY), on_complete)
        return await relay_stream(request, answer, hdrs, call.timeouts.idle, call, dep, encode, on_complete)
    except ProxyError as e:
        rec.status = e.status
        rec.error_class = rec.error_class or e.code or e.type
        if not rec.model and body is not None:  # refused before a decision: say what was asked for
            big = len(body) > DECIDE_ON_LOOP_BYTES  # a parse of megabytes is not the loop's to do
            rec.model = await asyncio.to_thread(_requested_model, body) if big else _requested_model(body)
        e.headers.setdefault(headers.REQUEST_ID, rid)
        if rec.correlation_id is not None:
            e.headers.setdefault(headers.CORRELATION_ID, rec.correlation_id)
        raise
    except asyncio.CancelledError:
        client_left(request, rec)  # the client hung up; the upstream call was cancelled with it
        raise
    finally:
        ResponseCache.discard(plan)  # a prefetch the request did not get to use
        finish(request, live, rec, started, ticket, reasons, app)


async def unreadable_first(e: ProxyError, call: Callable[[], Call]) -> None:
    """Admission's 429 for a deployment at its provider limit gives way to the 400 dispatch
    answers when none of the decision's deployments can read the request: it said "try again in
    12s" to a request no wait would let through (a URL document on a route of chat deployments)."""
    if e.code == "upstream_rate_limited":
        await call().refuse_unreadable()


def _not_recording(app: web.Application, live: Live) -> str | None:
    """Why a request that could spend is refused now (None: taken): another server holds the
    ledger's lock, or `ledger.on_unavailable: closed` and the ledger holds more unwritten
    records than `ledger.max_unwritten` while it cannot write."""
    if (why := ledger_lock.lost()) is not None:
        return why
    lc = live.config.ledger
    if lc is not None and lc.on_unavailable == "closed":
        ledger = app.get(RECORDER)
        if isinstance(ledger, Ledger) and ledger.failing_since is not None:
            if (n := ledger.queue_depth()) > lc.max_unwritten:
                return f"the spend ledger cannot write ({n} records unwritten) and ledger.on_unavailable is closed"
    return None


def begin(request: web.Request, app: web.Application | None = None) -> tuple[Live, RequestRecord, float]:
    """The start of every request that may call an upstream (chat, messages, embeddings,
    completions, responses, whichever path reached it: `/v1/...` or its alias at the root):
    refused while its spend could not be recorded (`_not_recording`); else the running config
    generation entered, the request's record (with the proxy's own id, always: a client's id
    would be spoofable and collide in the ledger and feedback), its log context and trace;
    the perf-counter start for `finish`. `app`: `request.app`, when the caller has it."""
    if app is None:
        app = request.app
    live = app[STATE].live
    if (why := _not_recording(app, live)) is not None:
        raise ProxyError(
            503, f"edgeroute is not taking requests: {why}; retry shortly.", code="ledger_unavailable",
            headers={"Retry-After": "5"},
        )  # fmt: skip
    live.enter()
    rid = new_request_id()
    bind_request(rid)
    started = time.perf_counter()
    rec = RequestRecord(request_id=rid, started=time.time(), model="", correlation_id=correlation_id(request))
    if (ident := request.get(IDENTITY)) is not None:
        # Whose request it is, from the start: one refused before admission (an unknown model,
        # a body that is not JSON) is its key's and team's too, in the request log and stats.
        rec.key, rec.team, rec.user = ident.key, ident.team, ident.user
    tracing.begin(request, rec)
    return live, rec, started


def client_left(request: web.Request, rec: RequestRecord) -> None:
    """Records a request whose client went away (its handler cancelled), unless its answer
    ended first: a client that closes once a stream's end is written (curl does) cancels the
    handler as it prices the stream, and an answer delivered whole was recorded `client_gone`."""
    if rec.outcome == "pending" and getattr(request.writer, "_eof", False):  # aiohttp's: its end written
        return
    if rec.outcome == "pending":  # not what already ended it (an upstream cutting its stream)
        rec.outcome = "client_gone"
    rec.error_class = rec.error_class or "client_gone"


def finish(
    request: web.Request,
    live: Live,
    rec: RequestRecord,
    started: float,
    ticket: Ticket | None,
    reasons: list[str],
    app: web.Application | None = None,
) -> None:
    """The end of every request, answered or not: its record completed (latency, cost, usage,
    outcome), its admission settled, then recorded (ledger, request log) and observed; an
    answered one is remembered by the feedback learner (whatever the endpoint: a Responses or
    a Messages request is decided as chat is, so feedback on it counts as on chat)."""
    if app is None:
        app = request.app
    live.leave()
    rec.latency_ms = (time.perf_counter() - started) * 1000
    attempts = rec.attempts
    rec.cost_usd = sum(a.cost_usd for a in attempts) if attempts else 0  # a hit has none
    for a in reversed(attempts):
        if a.usage is not None and a.outcome == "success":
            rec.usage = a.usage
            break
    else:
        if rec.cost_usd:  # none answered: what its attempts were billed (estimated) is its usage
            rec.usage = billed_usage(attempts)
    if rec.outcome == "pending":
        rec.outcome = "ok" if rec.status == 200 else ("client_gone" if rec.status == 0 else "error")
    app[ADMISSION].settle(ticket, rec)
    app[RECORDER].record(rec)
    telemetry.finished(app, rec, reasons)
    if live.stats is not None:  # the rollback guard watches this config generation
        live.stats.answered(rec)
    if (learner := app.get(LEARNER)) is not None and rec.status == 200:
        # Whose it is (feedback's owner check, the key's role its tenant); a hit (no attempt) and
        # a route the client named (no policy or experiment chose it) are remembered, not learned from.
        cached, ident = not attempts, request.get(IDENTITY)
        learner.served(
            rec.request_id, rec.route, rec.task, rec.cost_usd, key=rec.key, team=rec.team, cached=cached,
            role=ident.role if ident is not None else None, chosen=rec.policy is not None or rec.variant is not None,
        )  # fmt: skip


def servable(live: Live, d: _core.Decision, region: str | None) -> Mapping[str, str]:
    """The deployments whose cached answers a request decided as `d` may get, by name: what
    each is now (`DeploymentInfo.cached_as`). Those of its order, and the drained ones of its
    route that its rule and region allow (draining sends no new request there; the answers
    it gave are as good as they were). Worked out once per config generation and (order,
    route, rule, region): every lookup asks (a hit spent ~2.5 µs building it)."""
    memo = live.servable_memo
    key = (tuple(d.order), d.route, d.rule, region)
    if (got := memo.get(key)) is None:
        if len(memo) >= 4096:  # orders differ by health and weights: a few per route in practice
            memo.clear()
        got = memo[key] = MappingProxyType(_servable(live, d, region))
    return got


def _servable(live: Live, d: _core.Decision, region: str | None) -> dict[str, str]:
    allowed = dict(live.deployments[i].cached_as for i in d.order)
    for name in live.drained.get(d.route, ()):
        if name not in allowed and (i := live.index_of.get(name)) is not None:
            if rule_admits(live.config, name, d.rule, region):
                allowed[name] = live.deployments[i].cached_as[1]
    return allowed


def _counter(live: Live, body: bytes) -> Counter:
    """The exact prompt count for admission, in a worker thread: the core releases the GIL
    while it counts, so the event loop goes on serving."""
    return lambda: asyncio.to_thread(live.router.count_prompt, body)


def _tenant(request: web.Request, settings: RouteCache | None) -> str:
    ident = request.get(IDENTITY)
    scope = settings.scope if settings is not None else "key"
    return tenant_of(scope, ident.key if ident else None, ident.team if ident else None)


def _stream_saver(
    request: web.Request, plan: Plan, deployment: tuple[str, str], rec: RequestRecord
) -> Callable[[bytes], None]:
    """Stores a stream once it has ended cleanly, costed as its answer was (`answer_cost`)."""
    cache = request.app[CACHE]
    return lambda stream: cache.save_stream(plan, stream, deployment, answer_cost(rec.attempts))


def _stream_mirror(
    request: web.Request,
    live: Live,
    settings: Shadow,
    body: bytes,
    rec: RequestRecord,
    then: Callable[[bytes], None] | None,
    prompt_tokens: int | None,
) -> Callable[[bytes], None]:
    """A stream's completion callback that also mirrors the request (`shadow:`), as a JSON
    answer's is mirrored, with the streamed answer made whole for the shadow log
    (`prompt_tokens`: see `shadow.start`)."""

    def done(stream: bytes) -> None:
        if then is not None:
            then(stream)
        if shadow.sampled(settings.percent) and (completion := completion_from_stream(stream)) is not None:
            answer = orjson.dumps(completion)
            ident, tags = request.get(IDENTITY), tags_of(request)
            shadow.start(request.app, live, settings, body, rec, answer, ident, tags, prompt_tokens=prompt_tokens)

    return done


def keep_content(live: Live, rec: RequestRecord, decision: _core.Decision, body: bytes) -> None:
    """Hands the request body to the request log where `request_log` keeps content (only there)."""
    if (keep := live.config.request_log.content_for(rec.model, decision.route, rec.key)) != "none":
        rec.content_mode, rec.content_request = keep, body


# A stored answer past this many bytes is rendered for a hit off the event loop: the memo
# keeps small renders only, and a 900 KB answer as an Anthropic stream is tens of milliseconds.
RENDER_ON_LOOP_BYTES = 64 * 1024


def _rendering(entry: Entry, dialect: Dialect | None, stream: bool, usage: bool) -> Callable[[], bytes]:
    """What a hit sends, the stored answer in the client's API and form, as a call (rendered once
    per entry and form while the entry is hot; the encoders are deterministic)."""
    if dialect is None:
        return partial(entry.sse_body, usage) if stream else lambda: entry.body
    if not stream:
        return partial(entry.rendered, dialect, dialect.answer)
    return partial(entry.rendered, (dialect, usage), lambda _: dialect.stream()(entry.sse_body(usage)))


async def _replay(entry: Entry, dialect: Dialect | None, stream: bool, usage: bool) -> bytes:
    render = _rendering(entry, dialect, stream, usage)
    if len(entry.body) > RENDER_ON_LOOP_BYTES and (stream or dialect is not None):
        return await asyncio.to_thread(render)
    return render()


async def _rendered(entry: Entry, dialect: Dialect | None, stream: bool, usage: bool) -> bytes | None:
    """What a hit sends, or None when it cannot be given in the client's API. Such a hit is a
    miss, the upstream asked: served from the cache, its refusal (a 502 of an answer another API
    cannot carry) reached every caller of the tenant for the entry's life, and no retry could
    fix it."""
    try:
        return await _replay(entry, dialect, stream, usage)
    except ProxyError as e:
        log.warning("a cached answer cannot be given in the client's API (%s): asked upstream", e.message)
        return None


async def _cached_answer(
    request: web.Request,
    rec: RequestRecord,
    decision: _core.Decision,
    plan: Plan,
    entry: Entry,
    dialect: Dialect | None,
    error: ProxyError | None = None,
    data: bytes | None = None,
) -> web.StreamResponse:
    """Answers from the cache: a hit, or a stale entry after every deployment failed (`error`);
    `data` is what it sends when already rendered (`_rendered`)."""
    rec.deployment, rec.status, rec.cache, rec.saved_usd = entry.deployment, 200, plan.label, entry.cost_usd
    rec.cache_writer = entry.writer or None
    rec.outcome = "cache_hit" if error is None else "cache_stale"
    if rec.content_mode != "none":  # the answer as a miss keeps it (a stream's as its JSON)
        rec.content_response = entry.body
    hdrs = _route_headers(rec.request_id, decision, entry.deployment, rec)
    if rec.correlation_id is not None:  # echoed as on a miss: a hit must not look different to the client
        hdrs[headers.CORRELATION_ID] = rec.correlation_id
    hdrs[headers.CACHE] = plan.label
    hdrs["Age"] = str(int(entry.age()))
    if error is not None and (why := stale_reason(error)) is not None:  # what the stale answer stands in for
        hdrs[STALE_REASON] = why
    if plan.similarity is not None:
        hdrs[headers.CACHE_SIMILARITY] = f"{plan.similarity:.3f}"
    if data is None:
        data = await _replay(entry, dialect, decision.stream, decision.include_usage)
    if not decision.stream:
        hdrs[headers.COST] = f"{sum(a.cost_usd for a in rec.attempts):.8f}" if rec.attempts else "0.00000000"
        return ReadyResponse(data, hdrs, "application/json")
    out = web.StreamResponse(status=200, headers=hdrs)
    out.content_type = "text/event-stream"
    out.headers["Cache-Control"] = "no-cache"
    await out.prepare(request)
    await out.write_eof(data)  # the head, the whole replay as one chunk and the last chunk: one write, not two
    return out


def _requested_model(body: bytes) -> str:
    try:
        model = orjson.loads(body).get("model")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return model[:200] if isinstance(model, str) else ""


def _admission_note(rec: RequestRecord) -> str | None:
    """What admission did to the route, for the explanation: a budget's downgrade (the decision
    explained is the one for the model it sent the request to, which read as if the client had
    asked for that model), then why a budget's action was not taken."""
    action, _, budget = (rec.admission or "").partition(":")
    if action != "downgraded":
        return rec.admission_note
    down = f"downgraded from {rec.model} by budget {budget}"
    return down if rec.admission_note is None else f"{down}; {rec.admission_note}"


def _route_headers(rid: str, d: _core.Decision, deployment: str | None, rec: RequestRecord) -> dict[str, str]:
    note = _admission_note(rec)
    if rec.skipped:  # passed over before any call (`dispatch`)
        skipped = f"skipped {', '.join(name for name, _ in rec.skipped)}: cannot read the request"
        note = skipped if note is None else f"{note}; {skipped}"
    h = {
        headers.REQUEST_ID: rid,
        headers.ROUTE: d.route,
        headers.ATTEMPTS: str(len(rec.attempts)),
        headers.PROMPT_TOKENS: str(d.prompt_tokens) if d.tokens_exact else f"~{d.prompt_tokens}",
        headers.EXPLAIN: explain_header(d, note),
    }
    if deployment is not None:
        h[headers.DEPLOYMENT] = deployment
    if d.rule is not None:
        h[headers.RULE] = d.rule
    return h


def answered_headers(live: Live, rid: str, d: _core.Decision, rec: RequestRecord, call: Call) -> dict[str, str]:
    """The headers of an answer from upstream: where it went and how (hedged, spilled to a
    class's spare capacity, parameters its deployment could not honour left out)."""
    h = _route_headers(rid, d, rec.deployment, rec)
    if rec.correlation_id is not None:
        h[headers.CORRELATION_ID] = rec.correlation_id
    if call.hedged:
        h[headers.HEDGED] = "true"
    if call.spilled:
        h[headers.EXPLAIN] += spill_note(live.classes, d.priority, call.spilled)
    if dropped := getattr(call, "dropped", None):  # a pipeline's call (endpoints/pipeline.py)
        h[headers.DROPPED_PARAMS] = headers.name_list(dropped)
    return h


def _listed(request: web.Request, names: Iterable[str]) -> list[str]:
    """The public models a caller is shown: those its key may ask for (`models` on a managed
    key; every model for a key without the bound), so that a listing offers nothing the key
    is refused and names no other team's model."""
    ident = request.get(IDENTITY)
    allowed = ident.models if ident is not None else None
    return [n for n in names if allowed is None or n in allowed]


async def list_models(request: web.Request) -> web.Response:
    live = request.app[STATE].live
    models = _listed(request, live.config.models)
    if "anthropic-version" in request.headers:  # an Anthropic client: its SDK reads its own shape
        body = anthropic_models.page(models, request.query)
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "edgeroute"} for name in models]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def retrieve_model(request: web.Request) -> web.Response:
    live = request.app[STATE].live
    name = request.match_info["model"]
    if name not in live.config.models or not _listed(request, [name]):
        raise ProxyError(
            404, f"The model `{name}` does not exist or you do not have access to it.", code="model_not_found"
        )
    if "anthropic-version" in request.headers:
        obj: dict[str, Any] = anthropic_models.model(name)
    else:
        obj = {"id": name, "object": "model", "created": 0, "owned_by": "edgeroute"}
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def explain(request: web.Request) -> web.Response:
    """The routing decision for a chat request, without calling any upstream (counted against
    its key's RPM first: deciding a large body is CPU every tenant shares)."""
    async with free_requests.counted(request, "/v1/route/explain"):
        live = request.app[STATE].live
        body = await read_body(request)
        d = await decide_soon(live, body, request, explain=True)
        # What dispatch would do: the deployments that cannot read the request are skipped.
        rec = RequestRecord(request_id="", started=0.0, model=d.model)
        can, cannot = await Call(live, d, body, rec, live.config.models[d.route].timeouts, 1).readers()
    out: dict[str, Any] = {
        "model": d.model,
        "route": d.route,
        "rule": d.rule,
        "reasons": d.reasons,
        "strategy": d.strategy,
        "prompt_tokens": d.prompt_tokens,
        "tokens_exact": d.tokens_exact,
        "encoding": d.encoding,
        "deployment": can[0].name if can else None,
        "fallbacks": [dep.name for dep in can[1:]],
        "skipped": [{"deployment": dep.name, "why": e.message} for dep, e in cannot],
        "hedge_after_ms": d.hedge_after_ms,
        "variant": d.variant,
        "policy": d.policy,
        "task": d.task,
        "task_confidence": d.task_confidence,
        "difficulty": d.difficulty,
        "scores": dict(d.scores),
    }
    return web.Response(body=orjson.dumps(out), content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    app.router.add_post("/v1/route/explain", explain)
