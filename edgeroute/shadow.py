"""Shadow traffic: mirror a sample of a route's requests to a candidate model, off the
hot path, and record both answers and both costs. The shadow answer is never returned
to the client, and a shadow failure never affects the client's request.

The shadow request is decided for the client's key like the primary (team, role, and
residency: a key bound to a region is shadowed only within it).

Each pair becomes one JSON line in the shadow log (and the shadow request's spend goes
to the ledger like any other, marked `shadow`), ready for offline comparison.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import web

from edgeroute import _core, redact
from edgeroute.accounting import RequestRecord
from edgeroute.admission import ADMISSION
from edgeroute.config import Shadow
from edgeroute.cost.keys import Identity
from edgeroute.governance.residency import check_order, key_tags
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


class ShadowLog:
    """Appends JSON lines to a file from a thread (or keeps the last pairs in memory)."""

    def __init__(self, path: Path | None, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self.pairs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, pair: dict[str, Any]) -> None:
        with self._lock:
            self.pairs.append(pair)
            del self.pairs[: -self.keep]
            if self.path is not None:
                with self.path.open("ab") as f:
                    f.write(orjson.dumps(pair) + b"\n")


_rng = random.Random()
SHADOW_LOG = web.AppKey("shadow_log", ShadowLog)


def sampled(percent: float) -> bool:
    return percent > 0 and _rng.random() * 100 < percent


def pair_record(
    primary: RequestRecord, primary_answer: str | None, shadow: RequestRecord, shadow_answer: str | None
) -> dict[str, Any]:
    def side(rec: RequestRecord, answer: str | None) -> dict[str, Any]:
        return {
            "route": rec.route,
            "deployment": rec.deployment,
            "status": rec.status,
            "cost_usd": rec.cost_usd,
            "latency_ms": round(rec.latency_ms, 3),
            "completion_tokens": rec.usage.completion_tokens if rec.usage else None,
            "answer": answer,
        }

    return {
        "ts": time.time(),
        "request_id": primary.request_id,
        "primary": side(primary, primary_answer),
        "shadow": side(shadow, shadow_answer),
    }


def _redacted(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair with credentials in its answers replaced, as the request log stores answers (a
    model repeats what it was sent: a key pasted into a prompt, say)."""
    for side in (pair["primary"], pair["shadow"]):
        if side["answer"] is not None:
            side["answer"] = redact.text(side["answer"])
    return pair


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
) -> _core.Decision:
    """The core's decision for a shadow request, made for the client's key as the primary's
    was: its rules by team and role, its residency (a shadow never leaves the region) and the
    request's tags (`request_tags`: a rule keeping a tag to some deployments holds for the
    mirror too). `router`: another core to ask (a candidate router's), else the running one."""
    router = router or live.router
    if ident is None:
        return router.decide(body, tags=request_tags)
    tags = key_tags(ident, request_tags, live.regions)
    d = router.decide(body, tags=tags, team=ident.team, role=ident.role, user=ident.user, key=ident.key)
    if ident.residency is not None:
        check_order(live.config, (live.deployments[i].name for i in d.order), ident.residency)
    return d


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
) -> None:
    """Mirrors this answered request to the shadow candidate `settings` name, if it is sampled, and
    shows it to the candidate router under evaluation, if any (`tags`: the request's)."""
    if (candidate := app.get(CANDIDATE_ROUTER)) is not None:
        candidate.observe(live, body, decision, rec, ident)
    if settings is not None and sampled(settings.percent):
        start(app, live, settings, body, rec, answer, ident, tags)


def start(
    app: web.Application,
    live: Live,
    settings: Shadow,
    body: bytes,
    rec: RequestRecord,
    answer: bytes,
    ident: Identity | None = None,
    tags: list[str] | None = None,
) -> None:
    """Mirrors a request sampled already (`answer`: its chat completion, a stream's made whole)."""
    state = app[STATE]
    task = asyncio.get_running_loop().create_task(_mirror(app, live, settings.model, body, rec, answer, ident, tags))
    state.background.add(task)
    task.add_done_callback(state.background.discard)


async def _mirror(
    app: web.Application,
    live: Live,
    candidate: str,
    body: bytes,
    primary: RequestRecord,
    answer: bytes,
    ident: Identity | None,
    tags: list[str] | None,
) -> None:
    from edgeroute.dispatch import Call, JsonAnswer  # dispatch imports this module's caller

    rec = RequestRecord(request_id=primary.request_id + "-shadow", started=time.time(), model=candidate)
    rec.shadow_of = primary.request_id
    rec.key, rec.team, rec.user = primary.key, primary.team, primary.user
    t0 = time.perf_counter()
    text: str | None = None
    admission, ticket = None, None
    try:
        sbody = shadow_body(body, candidate)
        d = decide_as(live, sbody, ident, request_tags=tags)
        rec.route, rec.rule, rec.task = d.route, d.rule, d.task
        cfg = live.config.models[d.route]
        timeouts = cfg.timeouts or live.config.providers[live.deployments[d.order[0]].provider].timeouts
        admission = app.get(ADMISSION)
        ticket = admission.mirror_ticket(d) if admission is not None else None
        call = Call(live, d, sbody, rec, timeouts, cfg.max_attempts)
        if admission is not None:
            call.gate, call.first_counted = admission.attempt_gate(ticket), False
        result, dep = await call.run()
        rec.deployment, rec.status = dep.name, 200
        if isinstance(result, JsonAnswer):
            text = answer_text(result.body)
            rec.usage = next((a.usage for a in reversed(rec.attempts) if a.usage is not None), None)
    except Exception as e:  # a shadow must never hurt anything: record and move on
        rec.status = getattr(e, "status", 0) or 500
        log.info("shadow request %s failed: %s", rec.request_id, e)
    finally:
        rec.latency_ms = (time.perf_counter() - t0) * 1000
        rec.cost_usd = sum(a.cost_usd for a in rec.attempts)
        rec.outcome = "shadow"
        if admission is not None:
            admission.settle(ticket, rec)
        app[RECORDER].record(rec)
        if (seen := app.get(MIRRORED)) is not None:
            seen(rec)
        if (slog := app.get(SHADOW_LOG)) is not None:
            pair = pair_record(primary, answer_text(answer), rec, text)
            await asyncio.to_thread(lambda: slog.write(_redacted(pair)))
