"""Shadow traffic: mirror a sample of a route's requests to a candidate model, off the
hot path, and record both answers and both costs. The shadow answer is never returned
to the client, and a shadow failure never affects the client's request.

Every generation endpoint is mirrored (chat, `/v1/messages`, `/v1/responses`,
`/v1/completions`): the endpoint hands over how its request is decided and dispatched
(`Mirror`), so the mirror speaks the endpoint's format to a deployment that speaks it and
goes through the endpoint's own translation to any other. One that its deployment cannot
take faithfully (a legacy completion to Anthropic, say) is skipped, counted and logged:
never sent as a different request. So is one past the route's `max_in_flight` mirrors.

The shadow request is decided for the client's key like the primary (team, role, and
residency: a key bound to a region is shadowed only within it).

Each pair becomes one JSON line in the shadow log (and the shadow request's spend goes
to the ledger like any other, marked `shadow`), ready for offline comparison.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from edgeroute import _core, redact, shadow_log, sticky
from edgeroute.accounting import RequestRecord, stream_text
from edgeroute.admission import ADMISSION
from edgeroute.config import Config, Shadow, Timeouts
from edgeroute.cost.keys import Identity
from edgeroute.dispatch import Call, JsonAnswer
from edgeroute.governance.residency import check_order, key_tags
from edgeroute.metrics import METRICS
from edgeroute.state import RECORDER, STATE, Live

log = logging.getLogger("edgeroute.shadow")


def answer_text(body: bytes) -> str | None:
    """The assistant text of an OpenAI chat completion, if any."""
    try:
        obj = orjson.loads(body)
        content = obj["choices"][0]["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else None


def shadow_body(body: bytes, model: str) -> bytes:
    """The client's body for `model`, as a non-streaming request."""
    obj: dict[str, Any] = orjson.loads(body)
    obj["model"] = model
    obj.pop("stream", None)
    obj.pop("stream_options", None)
    return orjson.dumps(obj)


_rng = random.Random()


def sampled(percent: float) -> bool:
    return percent > 0 and _rng.random() * 100 < percent


class Observer(Protocol):
    """Sees each answered request (`router_shadow`: a candidate router's evaluation)."""

    def observe(
        self, live: Live, body: bytes, decision: _core.Decision, rec: RequestRecord, ident: Identity | None
    ) -> None: ...

    def after_stream(
        self,
        live: Live,
        body: bytes,
        decision: _core.Decision,
        rec: RequestRecord,
        ident: Identity | None,
        then: Callable[[bytes], None] | None,
    ) -> Callable[[bytes], None] | None:
        """A streamed answer's completion callback (`then`, or one that also observes it once
        the stream has ended cleanly)."""


CANDIDATE_ROUTER = web.AppKey("candidate_router", Observer)


class MirrorObserver(Protocol):
    def __call__(self, rec: RequestRecord) -> None:
        """Sees a finished mirror's record (its upstream calls and their cost)."""


# Set by the telemetry (a layer above): a mirror's calls and spend in the metrics and alerts.
MIRRORED = web.AppKey("mirrored", MirrorObserver)


def decide_as(
    live: Live,
    body: bytes,
    ident: Identity | None,
    router: _core.Router | None = None,
    request_tags: list[str] | None = None,
    prompt_tokens: int | None = None,
) -> _core.Decision:
    """The core's decision for a shadow request, made for the client's key as the primary's
    was: its rules by team and role, its residency (a shadow never leaves the region) and the
    request's tags (`request_tags`: a rule keeping a tag to some deployments holds for the
    mirror too). `router`: another core to ask (a candidate router's), else the running one.
    `prompt_tokens`: the prompt's exact count, when the body's text is not all of it (token ids)."""
    router = router or live.router
    if ident is None:
        return router.decide(body, tags=request_tags, prompt_tokens=prompt_tokens)
    tags = key_tags(ident, request_tags, live.regions)
    keyed = sticky.identity(live.config, live.experiment_salt, ident)  # its experiment arm its key's, not the body's
    d = router.decide(body, tags=tags, team=ident.team, role=ident.role, prompt_tokens=prompt_tokens, **keyed)
    if ident.residency is not None:
        check_order(live.config, (live.deployments[i].name for i in d.order), ident.residency)
    return d


# Makes a mirror's dispatch, in its endpoint's format: (live, decision, record, timeouts, max attempts).
MakeCall = Callable[[Live, _core.Decision, RequestRecord, Timeouts | None, int], Call]


@dataclass(frozen=True, slots=True)
class Mirror:
    """A mirror's request in its endpoint's terms, made from the shadow body (`shadow_body`)."""

    decide_on: bytes  # what the core decides on (chat: the body itself)
    call: MakeCall  # its dispatch: the endpoint's format, or its translation for the deployment
    text: Callable[[bytes], str | None] = answer_text  # a JSON answer's text, for the shadow log
    prompt_tokens: int | None = None  # the prompt's exact count when its text is not all of it (token ids)


# The shadow body -> its mirror: one per endpoint (`chat` for chat completions).
Prepare = Callable[[bytes], Mirror]


def chat(body: bytes) -> Mirror:
    """A chat completion's mirror: decided on and sent as it is (the adapter translates it)."""
    return Mirror(body, lambda live, d, rec, timeouts, attempts: Call(live, d, body, rec, timeouts, attempts))


# Mirrors not sent, by why: the route's `max_in_flight` mirrors were running (`busy`), or the
# deployment chosen for it cannot take the request faithfully in its format (`untranslatable`).
BUSY, UNTRANSLATABLE = "busy", "untranslatable"
_LOG_EVERY_S = 60.0  # a skip is logged once a minute per route and reason (each one is counted)


class Mirrors:
    """The mirrors of one process: how many run for each route (bounded by the route's
    `shadow.max_in_flight`), and the skipped ones, counted (`edgeroute_shadow_skipped_total`)."""

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()
        self.skipped: Counter[tuple[str, str]] = Counter()
        self._logged: dict[tuple[str, str], float] = {}

    def take(self, route: str, limit: int) -> bool:
        """One more mirror of `route`'s requests, unless `limit` of them run (then counted as skipped)."""
        if self.running[route] >= limit:
            self.skip(route, BUSY, f"{limit} mirrors of its requests are running (shadow.max_in_flight)")
            return False
        self.running[route] += 1
        return True

    def done(self, route: str) -> None:
        self.running[route] -= 1
        if self.running[route] <= 0:
            del self.running[route]

    def skip(self, route: str, reason: str, why: str) -> None:
        key = (route, reason)
        self.skipped[key] += 1
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[key] = now
            log.warning(
                "shadow mirror of a request to route %s skipped (%s, %d so far): %s",
                route, reason, self.skipped[key], redact.text(why),
            )  # fmt: skip

    def metrics(self, app: web.Application) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "edgeroute_shadow_skipped",
            "Sampled shadow mirrors not sent, by the primary's route and why (busy, untranslatable).",
            labels=["route", "reason"],
        )
        for (route, reason), n in list(self.skipped.items()):
            family.add_metric([redact.text(route), reason], n)
        yield family


MIRRORS = web.AppKey("mirrors", Mirrors)


def install(app: web.Application, config: Config, base_dir: Path | None) -> None:
    """The mirrors' state and metrics, and the shadow log where one is asked for (or a route has
    `shadow:`; kept in memory without `learning.shadow_log`)."""
    app[MIRRORS] = Mirrors()
    if (metrics := app.get(METRICS)) is not None:
        metrics.sources.append(app[MIRRORS].metrics)
    if config.learning.shadow_log is not None or any(m.shadow for m in config.models.values()):
        log_path = Path(config.learning.shadow_log) if config.learning.shadow_log else None
        if log_path is not None and base_dir is not None and not log_path.is_absolute():
            log_path = base_dir / log_path
        lc = config.learning
        app[shadow_log.SHADOW_LOG] = shadow_log.ShadowLog(
            log_path, max_bytes=lc.shadow_log_max_bytes, files=lc.shadow_log_keep
        )


def maybe_mirror(
    app: web.Application,
    live: Live,
    settings: Shadow | None,
    body: bytes,
    decision: _core.Decision,
    rec: RequestRecord,
    answer: bytes,
    ident: Identity | None = None,
    tags: list[str] | None = None,
    prompt_tokens: int | None = None,
) -> None:
    """Mirrors this answered request to the shadow candidate `settings` name, if it is sampled, and
    shows it to the candidate router under evaluation, if any (`tags`: the request's;
    `prompt_tokens`: see `start`)."""
    if (candidate := app.get(CANDIDATE_ROUTER)) is not None:
        candidate.observe(live, body, decision, rec, ident)
    if settings is not None and sampled(settings.percent):
        start(app, live, settings, body, rec, answer, ident, tags, prompt_tokens=prompt_tokens)


def after_stream(
    app: web.Application,
    live: Live,
    settings: Shadow,
    body: bytes,
    rec: RequestRecord,
    ident: Identity | None,
    tags: list[str] | None,
    prepare: Prepare,
    then: Callable[[bytes], None] | None,
) -> Callable[[bytes], None]:
    """A stream's completion callback (after `then`) that mirrors the request, if sampled, as a
    JSON request is mirrored: the stream has ended cleanly; its text is the shadow log's answer.
    The mirror itself asks for JSON (`shadow_body`)."""

    def done(stream: bytes) -> None:
        if then is not None:
            then(stream)
        if sampled(settings.percent):
            start(app, live, settings, body, rec, stream, ident, tags, prepare, stream_text)

    return done


def start(
    app: web.Application,
    live: Live,
    settings: Shadow,
    body: bytes,
    rec: RequestRecord,
    answer: bytes,
    ident: Identity | None = None,
    tags: list[str] | None = None,
    prepare: Prepare = chat,
    read: Callable[[bytes], str | None] = answer_text,
    *,
    prompt_tokens: int | None = None,
) -> None:
    """Mirrors a request sampled already, in the background, unless the route's `max_in_flight`
    mirrors are running (skipped, counted). `answer`: the primary's, whose text `read` finds
    for the shadow log (a chat completion, a stream's made whole); `prepare`: the endpoint's;
    `prompt_tokens`: the primary's prompt count when its text is not all of it (audio named by
    id, which the provider reads again for the mirror), for the mirror's provider limits."""
    state = app[STATE]
    mirrors = app.get(MIRRORS)
    route = rec.route
    if mirrors is not None and not mirrors.take(route, settings.max_in_flight):
        return
    mirror = _mirror(app, live, settings.model, body, rec, answer, ident, tags, prepare, read, mirrors, prompt_tokens)
    task = asyncio.get_running_loop().create_task(mirror)
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    if mirrors is not None:
        task.add_done_callback(lambda _: mirrors.done(route))


# A shadow body past this is parsed for its mirror in a worker thread (as the endpoints parse theirs).
_OFF_LOOP_BODY = 1 << 20


async def _unfit(call: Call) -> str | None:
    """Why none of the decision's deployments can take the mirror in its format (None: one can;
    the dispatch passes over those that cannot), the first one's reason, found as the dispatch
    finds it (`Call.readers`: the request built as the attempt would build it, and not sent):
    the endpoint's own rule (a completions request to a provider without the endpoint,
    Anthropic-only fields to one that rejects them, a Responses request without a chat form to
    a chat-only deployment)."""
    can, cannot = await call.readers(until_one=True)
    return cannot[0][1].message if cannot and not can else None


async def _mirror(
    app: web.Application,
    live: Live,
    candidate: str,
    body: bytes,
    primary: RequestRecord,
    answer: bytes,
    ident: Identity | None,
    tags: list[str] | None,
    prepare: Prepare,
    read: Callable[[bytes], str | None],
    mirrors: Mirrors | None,
    prompt_tokens: int | None,
) -> None:
    rec = RequestRecord(request_id=primary.request_id + "-shadow", started=time.time(), model=candidate)
    rec.shadow_of = primary.request_id
    rec.key, rec.team, rec.user = primary.key, primary.team, primary.user
    t0 = time.perf_counter()
    text: str | None = None
    admission, ticket = None, None
    skipped: str | None = None
    mirror: Mirror | None = None
    try:

        def made() -> Mirror:
            return prepare(shadow_body(body, candidate))

        mirror = await asyncio.to_thread(made) if len(body) > _OFF_LOOP_BODY else made()
        known = mirror.prompt_tokens if mirror.prompt_tokens is not None else prompt_tokens
        d = decide_as(live, mirror.decide_on, ident, request_tags=tags, prompt_tokens=known)
        rec.route, rec.rule, rec.task = d.route, d.rule, d.task
        cfg = live.config.models[d.route]
        call = mirror.call(live, d, rec, cfg.timeouts, cfg.max_attempts)
        if (skipped := await _unfit(call)) is not None:
            return  # nothing sent, nothing spent: counted and logged, not recorded
        admission = app.get(ADMISSION)
        ticket = admission.mirror_ticket(d, live) if admission is not None else None
        if admission is not None:
            call.gate, call.first_counted = admission.attempt_gate(ticket), False
        result, dep = await call.run()
        rec.deployment, rec.status = dep.name, 200
        if isinstance(result, JsonAnswer):
            text = mirror.text(result.body)
            rec.usage = next((a.usage for a in reversed(rec.attempts) if a.usage is not None), None)
    except Exception as e:  # a shadow must never hurt anything: record and move on
        rec.status = getattr(e, "status", 0) or 500
        # Never the error's text: an upstream's error may quote the request (the prompt).
        tried = ", ".join(dict.fromkeys(a.deployment for a in rec.attempts)) or "none"
        why = getattr(e, "code", None) or type(e).__name__
        log.info("shadow request %s failed: %s %s (deployments tried: %s)", rec.request_id, rec.status, why, tried)
    finally:
        if skipped is not None:
            if mirrors is not None:
                mirrors.skip(primary.route, UNTRANSLATABLE, f"to {candidate} ({rec.route}): {skipped}")
        else:
            await _recorded(app, live, primary, rec, t0, admission, ticket, read(answer), text)


async def _recorded(
    app: web.Application,
    live: Live,
    primary: RequestRecord,
    rec: RequestRecord,
    t0: float,
    admission: Any,
    ticket: Any,
    primary_text: str | None,
    text: str | None,
) -> None:
    """A finished mirror: its admission settled, recorded (ledger, request log, metrics) and
    its pair logged (its answers as the request log's content policy keeps them)."""
    rec.latency_ms = (time.perf_counter() - t0) * 1000
    rec.cost_usd = sum(a.cost_usd for a in rec.attempts)
    rec.outcome = "shadow"
    if admission is not None:
        admission.settle(ticket, rec)
    app[RECORDER].record(rec)
    if (seen := app.get(MIRRORED)) is not None:
        seen(rec)
    if (slog := app.get(shadow_log.SHADOW_LOG)) is not None:
        pair = shadow_log.pair_record(primary, primary_text, rec, text)
        mode = shadow_log.content_mode(live.config.request_log, primary, rec)
        await asyncio.to_thread(lambda: slog.write(shadow_log.governed(pair, mode)))
