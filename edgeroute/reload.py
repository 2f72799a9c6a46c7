"""Config hot reload: validate the new file, swap it in whole, or keep the old one.

A reload builds a new generation (config, compiled router, upstream pools) next to
the running one; only when everything validates is it swapped in, in one assignment.
Requests already running finish on the generation they started with; the old
generation's connection pools close once they have (bounded by the longest total
request timeout plus the drain timeout). The core carries
health state over for deployments whose provider and model did not change, and
keys are checked against the new generation at once (revoked keys stop working).

Budgets and rate limits reload with the rest (their counters are kept by name, so
spend already recorded carries over and a lowered limit applies at once). Some sections
are wired in when the server starts (the ledger and request log, shared state, learning,
the listening socket): a reload
that changes them is refused with the list, rather than half applied. The exception is
`learning.candidate_router`, which only observes: it follows every applied config (added,
changed, a retrained file, removed), and a candidate file that cannot be loaded leaves the
rest of the reload applied (`router_shadow` says why).

Every applied config (at start, by reload, SIGHUP, rollback or a runtime change over the
API) becomes a numbered version in the database with who applied it (governance/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web

from edgeroute import _core, redact, secrets, upstream
from edgeroute import config as config_mod
from edgeroute.config import Config, Learning
from edgeroute.cost.control import CostControl
from edgeroute.errors import ProxyError
from edgeroute.governance.runtime import GOV, Change, actor_of, answered
from edgeroute.state import STATE, Live, ServerState
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.reload")


class CandidateRouter(Protocol):
    """The candidate router under shadow evaluation (`router_shadow`, a layer above)."""

    async def reload(self, live: Live) -> None:
        """Follows the config just applied; never raises."""


CANDIDATE_RELOAD = web.AppKey("candidate_router_reload", CandidateRouter)


_T = TypeVar("_T")
_UNWATCHED: set[asyncio.Future[Any]] = set()  # changes whose callers went away, until they end


async def to_the_end(change: Coroutine[Any, Any, _T]) -> _T:
    """Runs a config change to its end even when its caller is cancelled (the admin API's
    client went away: a CLI killed, a proxy's timeout). Its version and audit entries are
    written by a thread that a cancellation does not stop, so a change cancelled while they
    were written was recorded and never applied: the audit log named a version that never
    ran. The caller's cancellation still reaches the caller."""
    task = asyncio.ensure_future(change)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        _UNWATCHED.add(task)
        task.add_done_callback(_forget)
        raise


def _forget(task: asyncio.Future[Any]) -> None:
    _UNWATCHED.discard(task)
    if not task.cancelled() and (e := task.exception()) is not None and not isinstance(e, config_mod.ConfigError):
        log.error("a config change whose caller went away failed: %s", type(e).__name__)


async def reload_from_source(app: web.Application, how: str = "reload", actor: str | None = None) -> Live:
    """Reloads the file the running config came from; raises ConfigError and keeps the old one
    (a refusal is written to the audit log, as an applied config is). Runs to its end once
    begun (`to_the_end`)."""
    return await to_the_end(_reload_from_source(app, how, actor))


async def _reload_from_source(app: web.Application, how: str, actor: str | None) -> Live:
    try:
        async with app[STATE].source_lock:
            source = app[STATE].live.source
            text = _read(source)
            cfg = await load_off_the_loop(text, source)
            return await apply_config(app, cfg, text, how, actor)
    except config_mod.ConfigError as e:
        if (gov := app.get(GOV)) is not None and not _sibling_of_a_signal(how):
            # What was wrong, as the caller is told (cut and redacted: a problem may quote the file).
            problems = [redact.text(redact.cut(p, 500)) for p in e.errors[:_AUDITED_PROBLEMS]]
            if len(e.errors) > _AUDITED_PROBLEMS:
                problems.append(f"... {len(e.errors) - _AUDITED_PROBLEMS} more")
            after = {"refused": True, "problems": problems}
            await gov.audit(actor or how, f"config.{how}_refused", "config", {"version": gov.versions.active}, after)
        raise


async def load_off_the_loop(text: str, source: str) -> Config:
    """`config.loads` in a thread: loading resolves its secrets, and an `exec:` command may take
    seconds (up to its timeout: a secrets CLI waiting on its server). On the event loop, every
    request and stream waited for it."""
    return await asyncio.to_thread(config_mod.loads, text, source)


_AUDITED_PROBLEMS = 20
# Applied even when they cannot be recorded (logged): the operator's file, and the rollback
# guard undoing a failing config.
_APPLIED_UNRECORDED = ("sighup", "auto_rollback")


def _sibling_of_a_signal(how: str) -> bool:
    """Under a supervisor, a SIGHUP reaches every worker and each refuses the same file:
    worker 0 audits the refusal for all (it was audited once per worker). An accepted
    SIGHUP is audited once by whichever worker stores the version first (`apply_config`)."""
    worker = workers.current()
    return how == "sighup" and worker is not None and worker.count > 1 and worker.id != 0


async def apply_config(
    app: web.Application, cfg: Config, text: str, how: str, actor: str | None, audit: Sequence[Change] = ()
) -> Live:
    """Swaps in a validated config whole, records it as a version and in the audit log (with
    `audit`, the caller's entries for the change, in the version's transaction, before the
    swap); raises ConfigError (nothing changed) when it cannot be applied."""
    state, gov = app[STATE], app.get(GOV)
    async with state.applying:  # the generation built here is the one swapped in, and its version
        old = state.live
        if fixed := restart_only_changes(old.config, cfg):
            raise config_mod.ConfigError([f"{old.source}: {p}" for p in fixed])
        try:
            new = Live.build(cfg, old.source, previous=old)
        except (_core.ConfigError, secrets.SecretError, OSError, ValueError) as e:
            # e.g. a secret file removed between validation and build: keep the running generation
            raise config_mod.ConfigError([f"{old.source}: {e}"]) from None
        # Stored before the swap and made active with it (no await between): a client answered
        # by the new config finds it in the versions, and the rollback guard counts every answer.
        # Under a supervisor, a SIGHUP that finds its text stored already as the latest version
        # follows a sibling that applied it (through the admin API, or the same signal first):
        # that one audits it and its rollback guard watches it. Each follower audited it again,
        # as a signal nobody sent, and watched it as a reload, a rollback too: rolled "back" to
        # the change the guard had just undone, and the workers flapped between the two.
        may_follow = how == "sighup" and workers.current() is not None
        try:
            saved = None
            if gov is not None:  # the version and its audit entries: one transaction, before the swap
                saved = await gov.save(text, how, actor, (old.config, cfg), audit, audit_if_same=not may_follow)
        except asyncio.CancelledError:  # a caller not run `to_the_end` (the admin API's are): nothing swapped
            _retire(state, new)
            raise
        if gov is not None and saved is None and not how.startswith(_APPLIED_UNRECORDED):
            # A change asked through the admin API is made only with its record: a change nobody
            # can find in the versions or the audit log is worse than a 503 to retry.
            _retire(state, new)
            raise ProxyError(
                503,
                "The config change cannot be recorded (the versions and audit log's database is "
                "unavailable); nothing was changed.",
                code="config_store_unavailable",
                headers={"Retry-After": "5"},
            )
        following = may_follow and saved is not None and not saved.created
        new.since = time.time()
        state.live = new
        if gov is not None and saved is not None:
            gov.activate(new, saved, "follow" if following else how)
        _retire(state, old)
    log.info("config applied (%s) from %s", how, old.source)
    if (candidate := app.get(CANDIDATE_RELOAD)) is not None:
        await candidate.reload(new)
    elif cfg.learning.candidate_router is not None:
        log.warning("learning.candidate_router is set but the request log is off: no shadow evaluation")
    return new


def _retire(state: ServerState, gen: Live) -> None:
    """Closes a generation's connection pools once no request runs on it, off the caller."""

    async def close() -> None:
        # Requests on the old generation (a long stream, say) finish on its pools; they end
        # by their total timeout at the latest, which bounds the wait.
        try:
            async with asyncio.timeout(_longest_request_s(gen.config) + gen.config.server.drain_timeout):
                await gen.wait_idle()
        except TimeoutError:
            log.warning("closing the previous config's connections with %d requests still on them", gen.in_flight)
        finally:
            state.retiring.discard(gen)
            for up in gen.upstreams.values():
                await up.close()
            upstream.retire_keys(gen.upstreams, state.live.upstreams)

    state.retiring.add(gen)  # at once: a budget read back after this reload waits for it
    task = asyncio.create_task(close())
    state.background.add(task)
    task.add_done_callback(state.background.discard)


def _read(source: str) -> str:
    p = Path(source)
    if not p.is_file():
        msg = "the running config was not loaded from a file (e.g. the demo's); there is nothing to reload"
        raise config_mod.ConfigError([f"{source}: {msg}"])
    return config_mod.read_text(p)  # not readable, or not UTF-8: a ConfigError naming the file


def _longest_request_s(cfg: Config) -> float:
    totals = [p.timeouts.total for p in cfg.providers.values()]
    totals += [m.timeouts.total for m in cfg.models.values() if m.timeouts is not None]
    return max(totals, default=0.0)


_AT_START = ("ledger", "request_log", "shared_state", "learning", "cache", "tracing")
_SERVER_AT_START = ("host", "port", "max_body_bytes", "drain_timeout", "decision_log")


def _restart_part(section: object) -> object:
    """A section as far as a restart applies it: the candidate router reloads (see above)."""
    if isinstance(section, Learning):
        return section.model_copy(update={"candidate_router": None})
    return section


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """What `new` changes that only a restart applies."""
    out = [
        f"{s}: changed; this section takes effect on restart"
        for s in _AT_START
        if _restart_part(getattr(old, s)) != _restart_part(getattr(new, s))
    ]
    out += [
        f"server.{f}: changed; this setting takes effect on restart"
        for f in _SERVER_AT_START
        if getattr(old.server, f) != getattr(new.server, f)
    ]
    if CostControl.wanted(old) != CostControl.wanted(new):
        out.append("keys, budgets, rate_limits: turning cost control on or off takes effect on restart")
    for f in ("managed_keys", "key_poll_interval"):  # the key store and its poller start with the server
        if getattr(old.governance, f) != getattr(new.governance, f):
            out.append(f"governance.{f}: changed; this setting takes effect on restart")
    return out


async def admin_reload(request: web.Request) -> web.Response:
    try:
        # Answered within the store's deadline, as the admin API's other changes are: a reload
        # on a hung version store hung its caller (and the next) until TCP keepalives gave up.
        live = await answered(reload_from_source(request.app, "reload", actor_of(request)))
    except config_mod.ConfigError as e:
        raise ProxyError(
            400,
            "The new config is invalid; the running config is unchanged.",
            code="invalid_config",
            details=[{"error": line} for line in e.errors],
            details_key="problems",
        ) from None
    workers.ask_siblings_to_reload(request.app.get(workers.WORKER))  # the same file, in every worker
    body = {"reloaded": True, "models": list(live.config.models), "deployments": len(live.deployments)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")
