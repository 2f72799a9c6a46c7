"""The governance admin API: `/admin/config*`, `/admin/keys*`, `/admin/audit`.

Roles are declared in `roles.ROUTE_ROLES`; every change is written to the audit log with
who made it and the state before and after (secrets and key hashes never included).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.metrics_core import Metric
from pydantic import ValidationError

from edgeroute import config as config_mod
from edgeroute import metrics, roles, secrets
from edgeroute.cache.service import CACHE
from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY, MANAGED_KEYS, tenant_of
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.errors import ProxyError, too_many
from edgeroute.governance import deployments, guard, key_names, residency, views
from edgeroute.governance import keys as K
from edgeroute.governance.apply import apply_text, editing, refused
from edgeroute.governance.http import json_object, json_response, only_params, parse_since, text_param
from edgeroute.governance.runtime import GOV, Change, Gov, actor_of, answered
from edgeroute.governance.store import ADMIN_CALLS, STORE_DEADLINE_S, GovStore, KeyCap
from edgeroute.governance.versions import (
    access_changes,
    check_text,
    restore,
    text_of,
    version_json,
)
from edgeroute.governance.weakening import weakenings
from edgeroute.governance.write_limit import WriteLimit
from edgeroute.metrics import METRICS
from edgeroute.reload import to_the_end
from edgeroute.requestlog import gate
from edgeroute.state import STATE, Live
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.governance")
_T = TypeVar("_T")


def install(app: web.Application, cfg: Config, source: str) -> None:
    p = Path(source)
    worker = workers.current()
    shared = worker.dir if worker is not None and worker.count > 1 else None
    store = GovStore.for_config(cfg, p.parent if p.is_file() else None, shared)
    store.audit_retention_s = cfg.governance.audit_retention_s
    app[STATE].live.experiment_salt = store.experiment_salt()  # keyed requests' arms (`sticky.py`)
    managed = None
    if cfg.governance.managed_keys:
        managed = K.ManagedKeys(
            store,
            lambda key_id, team, own: residency.region_of(cfg, key_id, team, own),
            cfg.governance.keys_stale_after_s,
        )
        ring = app[STATE].live.access.ring
        managed.makers = K.config_makers(cfg, ring.digests if ring is not None else None)
        managed.writes = WriteLimit(cfg.shared_state, "key_writes")  # shared by instances sharing Redis
        managed.restarted()  # config keys' tokens rotated while stopped keep their keys
        managed.load()
        app[MANAGED_KEYS] = managed
        managed.on_ended.append(app[CACHE].forget)
        app[CACHE].key_ended = managed.has_ended  # for as long as a key stays ended, not a fixed while
        app[METRICS].sources.append(lambda _: _key_store_metrics(managed))
    gov = Gov(store, managed)
    gov.on_applied = _guard_after_apply(app, frozenset(cfg.models))
    app[GOV] = gov
    secrets.set_refresh_interval(cfg.governance.secrets_refresh)
    try:  # a key that cannot be read is the config's problem, said as one (not a traceback)
        gov.versions.use_external(cfg.governance.versions_key, p.parent if p.is_file() else None)
    except secrets.SecretError as e:
        raise config_mod.ConfigError([f"{source}: governance.versions_key: {e}"]) from None
    gov.versions.record(text_of(cfg, source), "start", None)
    if worker is None or worker.id == 0:  # one server start, whatever its workers
        store.audit("server", "config.start", "config", None, {"version": gov.versions.active})

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_follow_secrets())]
        if managed is not None:
            interval = app[STATE].live.config.governance.key_poll_interval
            tasks.append(asyncio.create_task(managed.follow(interval, lambda: _stale_after(app))))
        yield
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if managed is not None:
            await managed.writes.close()
        await asyncio.to_thread(store.close)

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_get("/admin/config", get_config)
    r.add_get("/admin/config/versions", list_versions)
    r.add_get("/admin/config/versions/{version}", get_version)
    r.add_get("/admin/config/diff", diff_versions)
    r.add_post("/admin/config/rollback", rollback)
    r.add_post("/admin/config/check", check_config)
    r.add_get("/admin/audit", audit_log)
    r.add_post("/admin/keys", create_key)
    r.add_get("/admin/keys", list_keys)
    r.add_get("/admin/keys/{id}", get_key)
    r.add_patch("/admin/keys/{id}", update_key)
    r.add_delete("/admin/keys/{id}", revoke_key)
    r.add_post("/admin/keys/{id}/rotate", rotate_key)
    deployments.install(app)


def _stale_after(app: web.Application) -> float:
    return app[STATE].live.config.governance.keys_stale_after_s


def _key_store_metrics(managed: K.ManagedKeys) -> Iterable[Metric]:
    """The key poll's failures, and how old the view of the managed keys is."""
    yield metrics.counter(
        "edgeroute_key_store_poll_failures", "Managed-key polls that failed or went unanswered.", managed.poll_failures
    )
    yield metrics.counter(
        "edgeroute_key_store_refreshes",
        "Key store reads started for well-formed managed keys this instance did not know (beyond the poll).",
        managed.miss_reads,
    )
    yield metrics.gauge(
        "edgeroute_key_store_age_seconds",
        "Seconds since the managed keys were last read (past governance.keys_stale_after_s they are refused).",
        time.monotonic() - managed.last_good,
    )


async def _follow_secrets() -> None:
    """Re-reads changed `file:` secrets each second and due `exec:` ones (off the event loop)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(secrets.refresh)
        except Exception:
            log.exception("secret refresh failed")


# -- config -----------------------------------------------------------------------------------


async def get_config(request: web.Request) -> web.Response:
    gov = request.app[GOV]
    live = request.app[STATE].live
    return json_response(
        {
            "version": gov.versions.active,
            "source": live.source,
            "config": await views.masked_json(gov.versions.active_text),
        }
    )


async def list_versions(request: web.Request) -> web.Response:
    gov = request.app[GOV]
    found = await _stored(_VERSIONS, gov.store.versions)
    return json_response({"versions": [version_json(v, gov.versions.active) for v in found]})


def _version_param(raw: str | None, name: str) -> int:
    try:
        if raw is None:
            raise ValueError
        v = int(raw)
        if v < 1:
            raise ValueError
        return v
    except ValueError:
        raise ProxyError(400, f"'{name}' must be a version number (1, 2, ...).", param=name) from None


async def get_version(request: web.Request) -> web.Response:
    gov = request.app[GOV]
    v = await _stored(_VERSIONS, gov.versions.get, _version_param(request.match_info["version"], "version"))
    return json_response({**version_json(v, gov.versions.active), "config": await views.masked_json(v.body)})


async def diff_versions(request: web.Request) -> web.Response:
    gov = request.app[GOV]
    only_params(request, {"from", "to"})
    a = _version_param(request.query.get("from"), "from")
    b = _version_param(request.query.get("to") or str(gov.versions.active or ""), "to")
    va, vb = await _stored(_VERSIONS, lambda: (gov.versions.get(a), gov.versions.get(b)))
    return json_response({"from": a, "to": b, "diff": await views.diff(a, va.body, b, vb.body)})


async def rollback(request: web.Request) -> web.Response:
    body = await json_object(request)
    if set(body) - {"version"}:
        raise ProxyError(400, f"Unknown field(s): {', '.join(sorted(set(body) - {'version'}))}.")
    raw = body.get("version")
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ProxyError(400, "'version' must be a version number.", param="version")
    ident = request.get(IDENTITY)
    as_admin = ident is None or roles.permits(ident.role, "admin")  # no key: loopback, shared key
    # A store that does not confirm the change within its deadline: 503, the change may apply yet.
    return json_response(await answered(rollback_to(request.app, raw, actor_of(request), as_admin=as_admin)))


async def rollback_to(
    app: web.Application,
    version: int,
    actor: str,
    how: str = "rollback",
    audit: Sequence[Change] = (),
    as_admin: bool = True,
    every_worker: bool = True,
) -> dict[str, Any]:
    """Applies stored `version` whole (validated as a new file) and writes it back over the
    config file (audited with `audit` too); 404 for an unknown version, 409 (nothing changed)
    when it no longer validates. Not `as_admin` (a caller below admin, the rollback guard),
    403 when the version would change who may call what (`access_changes`) or weaken data
    governance (`weakenings`). Runs to its end once begun, its caller gone or not
    (`reload.to_the_end`): a change recorded is a change applied."""
    return await to_the_end(_rolled_back(app, version, actor, how, audit, as_admin, every_worker))


async def _rolled_back(
    app: web.Application,
    version: int,
    actor: str,
    how: str,
    audit: Sequence[Change],
    as_admin: bool,
    every_worker: bool,
) -> dict[str, Any]:
    gov = app[GOV]
    target = await _stored(_VERSIONS, gov.versions.get, version)
    async with gov.changing(), editing(app):
        before = gov.versions.active

        def restored() -> str:  # against the running config once no reload is in progress
            nonlocal before
            before = gov.versions.active
            text = restore(target.body, gov.versions.running_text, version, gov.versions.keys)
            if not as_admin:
                running = gov.versions.running_text
                access, weaker = access_changes(running, text), weakenings(running, text)
                held = guard.held_for_a_human(running, text) if how == "auto_rollback" else []
                if access or weaker or held:
                    raise _NeedsAdmin(access, weaker, held)
            return text

        try:
            written = await apply_text(app, restored, f"{how}:{version}", actor, audit, every_worker)
        except _NeedsAdmin as e:
            after = {"version": version, "needs": "admin", "changes": e.access, "weakens": e.governance}
            if e.held:
                after["undoes"] = e.held
            await gov.audit(actor, f"config.{how}_refused", "config", {"version": before}, after)
            raise ProxyError(403, e.message(version), code="permission_denied") from None
        except config_mod.ConfigError as e:
            await gov.audit(actor, f"config.{how}_refused", "config", {"version": before}, {"version": version})
            msg = f"Version {version} cannot be applied now; the running config is unchanged."
            raise refused(409, msg, "rollback_refused", e) from None
    return {"rolled_back_to": version, "version": gov.versions.active, "previous": before, "file_updated": written}


class _NeedsAdmin(Exception):
    """A rollback below admin would change these access fields (`access_changes`) or weaken
    data governance so (`weakenings`); the guard's would also undo a cost control or a
    deployment's removal (`guard.held_for_a_human`)."""

    def __init__(self, access: list[str], governance: list[str], held: list[str] | None = None) -> None:
        super().__init__(access, governance, held)
        self.access, self.governance, self.held = access, governance, held or []

    def message(self, version: int) -> str:
        what = []
        if self.access:
            what.append(f"changes who may call what ({', '.join(self.access)})")
        if self.governance:
            shown = self.governance[:5] + ([f"{len(self.governance) - 5} more"] if len(self.governance) > 5 else [])
            what.append(f"weakens data governance ({'; '.join(shown)})")
        if self.held:
            what.append(f"undoes a cost control or a removal ({'; '.join(self.held[:5])})")
        return (
            f"Version {version} {' and '.join(what)}: rolling back to it needs a key with role 'admin'. "
            "The running config is unchanged."
        )


def _guard_after_apply(app: web.Application, at_start: frozenset[str]) -> Callable[[Live, str, int | None], None]:
    """Starts the rollback guard's watch of a generation applied by reload (not by rollback)."""

    models = [at_start]  # the models of the generation applied before: a 404 for one gone is the reload's

    def start(live: Live, how: str, previous: int | None) -> None:
        had, models[0] = models[0], frozenset(live.config.models)
        guard_cfg = live.config.governance.rollback_guard
        if guard_cfg is None or previous is None or how.startswith(("rollback", "auto_rollback", "start", "follow")):
            return
        stats = live.stats = guard.GenerationStats(gone_models=had - models[0])

        async def run() -> None:
            why = await guard.watch(stats, guard_cfg, lambda: app[STATE].live is live)
            if why is None:
                return
            log.error("rollback guard: the config applied by %s failed (%s); rolling back to version %d",
                      how, why, previous)  # fmt: skip
            try:
                reason = ("config.auto_rollback.reason", "config", None, {"reason": why})
                # Never an access change nor a weaker governance: a revocation or demotion undone
                # because errors rose (which a client may cause) would hand the key back to whoever
                # held it, a PII rule or residency undone would send prompts where they may not go.
                # Nor a tighter budget or rate limit, nor a deployment or provider brought back.
                # Each worker's guard judges its own answers: a file that cannot be written (the
                # other workers cannot follow) does not keep a failing config on this one.
                await rollback_to(app, previous, "rollback-guard", "auto_rollback", [reason],
                                  as_admin=False, every_worker=False)  # fmt: skip
            except ProxyError as e:
                log.error("rollback guard: cannot roll back to version %d: %s", previous, e.message)

        state = app[STATE]
        task = asyncio.create_task(run())
        state.background.add(task)
        task.add_done_callback(state.background.discard)

    return start


# A config is a few kilobytes; checking one costs ~13 s of CPU per MiB of YAML (the loader is
# pure Python) and stalls the event loop for up to a second per MiB (its garbage). The route is
# a viewer's (a dashboard's key): bounded in size, and one check at a time per process.
MAX_CHECK_BYTES = 256 * 1024


async def check_config(request: web.Request) -> web.Response:
    too_large = ProxyError(413, f"A config to check is at most {MAX_CHECK_BYTES // 1024} KiB.", code="config_too_large")
    if request.content_length is not None and request.content_length > MAX_CHECK_BYTES:
        raise too_large
    gov = request.app[GOV]
    if gov.checking:
        raise ProxyError(
            429, "Another config check is running; try again.", code="check_busy", headers={"Retry-After": "1"}
        )
    gov.checking = True
    try:
        raw = await request.read()
        if len(raw) > MAX_CHECK_BYTES:
            raise too_large
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return json_response({"ok": False, "errors": ["the body is not UTF-8 text"]})
        errors = await asyncio.to_thread(check_text, text, "<check>")
    finally:
        gov.checking = False
    return json_response({"ok": not errors, "errors": errors, "references": "unresolved"})


# -- audit ------------------------------------------------------------------------------------


async def audit_log(request: web.Request) -> web.Response:
    """Newest first, a page at a time: `next_before_id`, when set, is the `before_id` of the
    next (older) page. Without it a flood of new entries (an operator's refused calls) pushed an
    admin's action past the 1000 a call returns, out of reach of `since` alone."""
    only_params(request, {"since", "until", "actor", "action", "limit", "before_id"})
    q = request.query
    since = parse_since(q["since"]) if "since" in q else None
    until = _until(q["until"]) if "until" in q else None
    limit = _int_param(q.get("limit", "200"), "limit", 1000)
    before_id = _int_param(q["before_id"], "before_id", 2**63 - 1) if "before_id" in q else None
    actor, action = (text_param(q[p], p) if p in q else None for p in ("actor", "action"))
    store = request.app[GOV].store
    # On the operator's query pool, under its deadline and per-key limits, on a connection of its
    # own (redU M2: a viewer's unbounded scans held the store's lock, and key writes got 503).
    try:
        entries = await gate.run_until(
            request,
            lambda end: store.audit_entries(since, actor, action, limit, before_id, until, end),
            "a shorter `since`, an exact `action` or `actor`, or a smaller `limit`",
        )
    except Exception as e:
        if not _database_error(e):
            raise
        log.error("governance: the audit log store cannot be read now (%s)", type(e).__name__)
        raise ProxyError(
            503,
            "The audit log store cannot be read now. Try again shortly.",
            code=_AUDIT[1],
            headers={"Retry-After": "1"},
        ) from None
    more = entries[-1].id if len(entries) == limit else None
    return json_response({"entries": [e.as_json() for e in entries], "next_before_id": more})


def _until(raw: str) -> float:
    """`until` as `since` reads it (epoch seconds, or a span back from now)."""
    try:
        return parse_since(raw)
    except ProxyError:
        raise ProxyError(400, "'until' must be epoch seconds or a span such as 15m, 24h, 7d.", param="until") from None


def _int_param(raw: str, name: str, most: int) -> int:
    try:
        n = int(raw)
        if not 1 <= n <= most:
            raise ValueError
    except ValueError:
        raise ProxyError(400, f"'{name}' must be an integer from 1 to {most}.", param=name) from None
    return n


# -- keys -------------------------------------------------------------------------------------


def _managed(request: web.Request) -> K.ManagedKeys:
    managed = request.app[GOV].managed
    if managed is None:
        raise ProxyError(
            409,
            "Managed keys are off; set governance.managed_keys: true in the config and restart the server.",
            code="managed_keys_off",
        )
    return managed


def _fields(body: dict[str, Any]) -> K.KeyFields:
    try:
        return K.KeyFields.model_validate(body)
    except ValidationError as e:
        raise K.bad_fields(e) from None


def _check_models(request: web.Request, f: K.KeyFields) -> None:
    """A key's models must be the config's public models: a misspelt one made a key that every
    request of it was refused with, without a word when it was made."""
    known = request.app[STATE].live.config.models
    unknown = [m for m in f.models or () if m not in known]
    if unknown:
        raise ProxyError(400, f"models: no model {', '.join(map(repr, unknown[:5]))} in the config.",
                         code="invalid_key", param="models")  # fmt: skip


def _check_name(request: web.Request, f: K.KeyFields) -> None:
    if f.name is not None and (why := key_names.refusal(f.name, request.app[STATE].live.config.keys)):
        raise ProxyError(400, f"name: {why}.", code="invalid_key", param="name")


def _check_residency(request: web.Request, f: K.KeyFields) -> None:
    if f.residency is None:
        return
    live = request.app[STATE].live
    res = live.config.governance.residency
    if res is None:
        raise ProxyError(400, "residency: needs governance.residency in the config.", code="invalid_key",
                         param="residency")  # fmt: skip
    if f.residency not in residency.regions(live.config):
        raise ProxyError(
            400, f"residency: no deployment is tagged {res.tag_prefix}{f.residency}.", code="invalid_key",
            param="residency",
        )  # fmt: skip


def _check_user(request: web.Request, creator: Any, f: K.KeyFields) -> None:
    """A team's key names only its own team's users: a user that a key of another team (or of
    none) names, or that a `scope: user` budget holds while no key of the team names it, is
    someone else's, and a key bound to them would spend their budget (a 429 for its owners)
    and be routed by rules for them. 403 for a team's key; a global key putting a key of one team
    on a user another team's keys name is told which (409): the two teams would share the
    user's budget. A key of no team names any user. A name mixing Latin, Greek and Cyrillic
    letters (`b\u043eb`, a Cyrillic o) is refused: it passes for another user's in every view."""
    if f.user is None:
        return
    if _mixed_script(f.user):
        raise ProxyError(
            400, "user: mixes letters of Latin, Greek or Cyrillic script; name the user in one script.",
            code="invalid_key", param="user",
        )  # fmt: skip
    team = f.team
    if team is None:
        return
    cfg = request.app[STATE].live.config
    named = [(k.team, k.user) for k in cfg.keys.values()]
    if (managed := request.app[GOV].managed) is not None:
        named += [(d.get("team"), d.get("user")) for d in managed.all()]
    user = _look(f.user)
    ours = any(u is not None and _look(u) == user and t == team for t, u in named)
    others = sorted({str(t) for t, u in named if u is not None and _look(u) == user and t != team})
    if others and (creator is None or creator.team is None):
        raise ProxyError(
            409,
            f"User '{f.user}' is named by keys of {', '.join(repr(t) for t in others)}: a key of team '{team}' "
            "for them would share their budget. Name another user, or revoke or move those keys first.",
            code="user_conflict", param="user",
        )  # fmt: skip
    if creator is None or creator.team is None:
        return
    budgeted = any(b.scope == "user" and b.match is not None and _look(b.match) == user for b in cfg.budgets.limits)
    if others or (budgeted and not ours):
        raise ProxyError(
            403,
            f"User '{f.user}' is not one of team '{team}''s users: a team's key may name only its own team's users.",
            code="permission_denied", param="user",
        )  # fmt: skip


_CONFUSABLE_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")


def _mixed_script(name: str) -> bool:
    """Whether `name` has letters of more than one of Latin, Greek and Cyrillic, the scripts
    whose letters pass for each other (UTS #39's mixed-script check, for those three)."""
    seen = set()
    for c in unicodedata.normalize("NFKC", name):
        if c.isalpha():
            script = unicodedata.name(c, "").partition(" ")[0]
            if script in _CONFUSABLE_SCRIPTS:
                seen.add(script)
    return len(seen) > 1


def _look(user: str) -> str:
    """What a user name looks like: NFKC, case-folded, without whitespace, invisible format
    characters (zero-width space, joiners) or combining marks on their own (the grapheme
    joiner, variation selectors): `Bob`, ` bob`, `bob\u200b`, `bob\u034f`, `bob\ufe0f` and
    full-width `\uff42\uff4f\uff42` are `bob` to whoever reads the spend by user, so one team's key
    cannot pass as another's user."""
    folded = unicodedata.normalize("NFKC", user).casefold()
    return "".join(c for c in folded if not c.isspace() and unicodedata.category(c) not in ("Cf", "Mn", "Me"))


async def _key_change(fn: Callable[..., _T], *args: Any) -> _T:
    """Runs a key change (with its audit entry, one transaction) off the loop; a database that
    cannot take it is a 503 saying nothing was changed, so the caller knows to try again."""
    try:
        return await _bounded(fn, *args)
    except TimeoutError:
        log.error("managed keys: the key store did not answer a change within %g s", STORE_DEADLINE_S)
        raise ProxyError(
            503,
            f"The key store did not answer within {STORE_DEADLINE_S:g} s. A change is made whole (with its audit "
            "entry) or not at all: look at the key before trying again.",
            code="key_store_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    except ProxyError:
        raise
    except Exception as e:
        if not _database_error(e):
            raise
        log.error("managed keys: a change could not be written, nothing changed (%s: %s)", type(e).__name__, e)
        raise ProxyError(
            503,
            "The key store cannot be written now: nothing was changed and nothing audited. Try again.",
            code="key_store_unavailable",
            headers={"Retry-After": "1"},
        ) from None


# What `_stored` names in a 503: the part of the governance store a route reads, and its code.
_KEYS = ("key store", "key_store_unavailable")
_VERSIONS = ("config version store", "config_store_unavailable")
_AUDIT = ("audit log store", "audit_store_unavailable")


async def _bounded(fn: Callable[..., _T], *args: Any) -> _T:
    """`fn(*args)` off the loop, waited for at most STORE_DEADLINE_S (TimeoutError): a query hung
    on a vanished peer held the admin call until the connection's keepalives ended it."""
    run = functools.partial(contextvars.copy_context().run, fn, *args)  # as `asyncio.to_thread` does
    call = asyncio.get_running_loop().run_in_executor(ADMIN_CALLS, run)
    return await asyncio.wait_for(call, STORE_DEADLINE_S)


async def _stored(what: tuple[str, str], fn: Callable[..., _T], *args: Any) -> _T:
    """A read of the governance store for an admin call: a database that cannot answer, or not
    within STORE_DEADLINE_S, is a 503 naming `what` (in the API's error format), never a hang."""
    name, code = what
    try:
        return await _bounded(fn, *args)
    except TimeoutError:
        why = f"did not answer within {STORE_DEADLINE_S:g} s"
    except StoreUnavailable:
        why = "does not answer (a call before this one is still waiting for it)"
    except Exception as e:
        if not _database_error(e):
            raise
        why = f"cannot be read now ({type(e).__name__})"
    log.error("governance: the %s %s", name, why)
    raise ProxyError(503, f"The {name} {why}. Try again shortly.", code=code, headers={"Retry-After": "1"})


def _database_error(e: Exception) -> bool:
    return isinstance(e, StoreUnavailable) or type(e).__module__.startswith(("sqlite3", "psycopg"))


async def _read_back(managed: K.ManagedKeys) -> None:
    """Reads a key change just committed into this instance's view. Made and audited already, it
    is answered whatever the database does now: its connection lost after the commit turned the
    answer into a 500, and the secret a creation or rotation shows once was lost with it (a
    rotation without grace left the key with no secret anyone knew). The poller reads it then.
    Waited for at most the poll's deadline: a hung poll held the answer as long as it hung."""
    if not await managed.read_since(time.monotonic(), K.POLL_DEADLINE_S):
        log.warning("managed keys: a change was made but not read back yet; the next poll reads it")


def _creator(request: web.Request) -> tuple[Any, dict[str, Any] | None]:
    ident = request.get(IDENTITY)
    managed = request.app[GOV].managed
    raw = managed.raw(ident.key) if ident is not None and managed is not None else None
    return ident, raw


async def create_key(request: web.Request) -> web.Response:
    managed = _managed(request)
    body = await json_object(request)
    creator, creator_raw = _creator(request)
    if creator is not None:
        # A team's key (or a user's, a region's) may make keys of its own team (user, region)
        # alone: a body that leaves the field out means that one, rather than a 403 asking for
        # the only value allowed (an explicit null still asks for a global key, and is refused).
        for name, have in (("team", creator.team), ("user", creator.user), ("residency", creator.residency)):
            if have is not None and name not in body:
                body[name] = have
    f = _fields(body)
    if f.expires_at is not None and f.expires_at <= time.time():
        raise ProxyError(400, "expires_at: must be in the future.", code="invalid_key", param="expires_at")
    _check_name(request, f)
    _check_models(request, f)
    _check_residency(request, f)
    K.check_classes(f, request.app[STATE].live.classes)
    K.check_scope(creator, creator_raw, f)
    _check_user(request, creator, f)
    actor = actor_of(request)
    parent = _maker(request, creator, creator_raw)
    if creator_raw is not None and managed.depth(creator.key) >= K.MAX_DEPTH:
        raise ProxyError(
            403, f"Keys can be created at most {K.MAX_DEPTH} levels below a key from the config.",
            code="permission_denied",
        )  # fmt: skip
    cap = _room_for(request, managed, f.team)
    await _may_write(request, managed)
    # The audit entry is written in the change's own transaction (governance/store.py).
    digest = ring.digests.get(creator.key) if (ring := request.app[STATE].live.access.ring) is not None else None
    fingerprint = managed.maker_print(creator.key, digest) if digest is not None and creator_raw is None else None
    data, token = await _key_change(K.create, managed.store, f, actor, parent, fingerprint, cap)
    await _read_back(managed)
    out = K.public(data)
    return json_response({**out, "secret": token}, status=201)


def _maker(request: web.Request, creator: Any, creator_raw: dict[str, Any] | None) -> str | None:
    """The `parent` a new key records: the managed key that made it, or the config key
    (`config:<id>`), whose removal or demotion ends it and whose limits and budgets bound it."""
    if creator is None:
        return None
    if creator_raw is not None:
        return str(creator.key)
    if creator.key not in request.app[STATE].live.config.keys:
        # Removed from the config while its request's body came in (a reload during the read):
        # a key made now would have no parent, and outlive the removal that was to end it.
        raise ProxyError(401, f"API key {creator.key} is no longer in the config.", code="key_revoked")
    return K.CONFIG_PARENT + str(creator.key)


def _room_for(request: web.Request, managed: K.ManagedKeys, team: str | None) -> KeyCap:
    """409 when `team` (None: no team) holds as many live keys as the config allows, as this
    instance sees them; else the bound the write checks again in its transaction (`KeyCap`),
    where concurrent creations, on this instance or another, are counted."""
    gov = request.app[STATE].live.config.governance
    most, setting = (
        (gov.max_keys_per_team, "max_keys_per_team") if team is not None
        else (gov.max_keys_without_team, "max_keys_without_team")
    )  # fmt: skip
    whose = f"Team '{team}' has" if team is not None else "Keys of no team number"

    def refused() -> ProxyError:
        msg = f"{whose} {most} live keys (governance.{setting}): revoke keys no longer used first."
        return ProxyError(409, msg, code="key_limit_reached")

    if managed.live(team) >= most:
        raise refused()
    return KeyCap(most, managed.ended_with_maker, refused)


async def _may_write(request: web.Request, managed: K.ManagedKeys) -> None:
    """429 (with Retry-After) past `governance.key_writes_per_minute` writes by the caller's team,
    or by the caller when it has none: each write is an audit entry and a read on every instance.
    Counted in Redis with `shared_state` (every instance and worker together), else per process."""
    ident = request.get(IDENTITY)
    writer = f"team:{ident.team}" if ident is not None and ident.team else f"key:{actor_of(request)}"
    per_minute = request.app[STATE].live.config.governance.key_writes_per_minute
    wait = await managed.writes.take(writer, per_minute)
    if wait > 0:
        raise too_many(
            f"Too many key changes: at most {per_minute} a minute (governance.key_writes_per_minute). "
            "Revocations are never held back.",
            "key_writes_rate_limited",
            wait,
        )


def _config_key(request: web.Request, key_id: str) -> dict[str, Any] | None:
    k = request.app[STATE].live.config.keys.get(key_id)
    if k is None:
        return None
    return {"id": key_id, "user": k.user, "team": k.team, "role": k.role, "source": "config", "status": "active",
            "rpm": k.limits.rpm if k.limits else None, "tpm": k.limits.tpm if k.limits else None,
            "max_parallel": k.limits.max_parallel if k.limits else None}  # fmt: skip


def _visible(request: web.Request, key: dict[str, Any] | None) -> bool:
    """A team-bound caller sees its team's keys alone (`tenant_of`); others, every key."""
    team = tenant_of(request)
    return key is not None and (team is None or key.get("team") == team)


async def list_keys(request: web.Request) -> web.Response:
    out = [_config_key(request, k) for k in request.app[STATE].live.config.keys]
    managed = request.app[GOV].managed
    if managed is not None:
        out += [managed.shown(d) for d in sorted(managed.all(), key=lambda d: d["created_at"])]
    return json_response({"keys": [k for k in out if _visible(request, k)]})


async def get_key(request: web.Request) -> web.Response:
    key_id = text_param(request.match_info["id"], "id")
    if (ck := _config_key(request, key_id)) is None:
        managed = _managed(request)
        data = await _stored(_KEYS, managed.store.get_key, key_id)
        ck = managed.shown(data) if data is not None else None
    if not _visible(request, ck):  # another team's key: as unknown as a key that never was
        raise ProxyError(404, f"No key {key_id}.", code="key_not_found")
    return json_response(ck)


def _not_config(request: web.Request, key_id: str) -> None:
    if key_id in request.app[STATE].live.config.keys:
        if not _visible(request, _config_key(request, key_id)):
            raise ProxyError(404, f"No managed key {key_id}.", code="key_not_found")
        raise ProxyError(409, f"Key {key_id} is defined in the config file and is read-only here.",
                         code="key_read_only")  # fmt: skip


async def update_key(request: web.Request) -> web.Response:
    key_id = text_param(request.match_info["id"], "id")
    _not_config(request, key_id)
    managed = _managed(request)
    body = await json_object(request)
    current = await _stored(_KEYS, managed.store.get_key, key_id)
    if current is None:
        raise ProxyError(404, f"No managed key {key_id}.", code="key_not_found")
    await _within_scope(request, managed, key_id, "change")
    merged = {k: current.get(k) for k in K.KeyFields.model_fields} | body
    f = _fields(merged)
    if "expires_at" in body and f.expires_at is not None and f.expires_at <= time.time():
        raise ProxyError(400, "expires_at: must be in the future.", code="invalid_key", param="expires_at")
    if "name" in body:  # as for models: a name given before the check blocks no other change
        _check_name(request, f)
    if "models" in body:  # a model since taken out of the config does not block other changes
        _check_models(request, f)
    _check_residency(request, f)
    K.check_classes(f, request.app[STATE].live.classes)
    K.check_scope(*_creator(request), f)
    if "user" in body:
        _check_user(request, request.get(IDENTITY), f)
    changes = f.model_dump(include=set(body))
    moved = "team" in body and f.team != current.get("team")
    revived = "expires_at" in body and (until := current.get("expires_at")) is not None and until <= time.time()
    cap = _room_for(request, managed, f.team) if moved or revived else None  # checked again in the write
    await _may_write(request, managed)
    kept: dict[str, float] = {}
    if revived:  # the keys that ended with it stay ended: each is brought back on its own (and counted)
        await managed.read_since(time.monotonic(), K.POLL_DEADLINE_S)  # those made just before it expired
        kept = managed.kept_ended(key_id, current.get("expires_at"))
    before, after = await _key_change(K.update, managed.store, key_id, changes, actor_of(request), cap, kept)
    if before is after:  # nothing to change: no audit entry, as for a deployment
        return json_response({**K.public(after), "action": "unchanged"})
    await _read_back(managed)
    return json_response({**K.public(after), "kept_ended": len(kept)} if revived else K.public(after))


async def _within_scope(request: web.Request, managed: K.ManagedKeys, key_id: str, verb: str) -> None:
    """A key may rotate or revoke only a key it could have created: a rotation hands over the
    new secret, so a key held to a budget, rate limits or models would otherwise take over a
    broader one (an unlimited admin key, say)."""
    current = await _stored(_KEYS, managed.store.get_key, key_id)
    if current is None:
        return  # the change itself answers 404
    if not _visible(request, current):  # another team's key: the 404 of an unknown one
        raise ProxyError(404, f"No managed key {key_id}.", code="key_not_found")
    creator, creator_raw = _creator(request)
    if creator_raw is not None and key_id not in managed.spenders(creator.key):
        # A managed key manages itself and the keys below it, whose spend its budget bounds:
        # a key elsewhere, brought within its scope, would spend outside that budget.
        raise ProxyError(
            403,
            f"This key cannot {verb} key {key_id}, which it could not have created: "
            "a managed key manages only itself and the keys below it.",
            code="permission_denied",
        )
    try:
        K.check_scope(*_creator(request), _fields({k: current.get(k) for k in K.KeyFields.model_fields}))
    except ProxyError as e:
        raise ProxyError(
            403, f"This key cannot {verb} key {key_id}, which it could not have created: {e.message}", code=e.code
        ) from None


async def revoke_key(request: web.Request) -> web.Response:
    key_id = text_param(request.match_info["id"], "id")
    _not_config(request, key_id)
    managed = _managed(request)
    await _within_scope(request, managed, key_id, "revoke")
    before, after = await _key_change(K.revoke, managed.store, key_id, actor_of(request))
    await _read_back(managed)
    await managed.settle()  # what it (and the keys it made) stored in the cache goes now
    if before is after:  # revoked already: no second entry, as for a deployment unchanged
        return json_response({**K.public(after), "action": "unchanged"})
    return json_response(K.public(after))


async def rotate_key(request: web.Request) -> web.Response:
    key_id = text_param(request.match_info["id"], "id")
    _not_config(request, key_id)
    managed = _managed(request)
    body = await json_object(request)
    if set(body) - {"grace_seconds"}:
        raise ProxyError(400, f"Unknown field(s): {', '.join(sorted(set(body) - {'grace_seconds'}))}.")
    grace = body.get("grace_seconds", 0)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 30 * 86400:
        raise ProxyError(400, "'grace_seconds' must be a number from 0 to 2592000 (30 days).", param="grace_seconds")
    await _within_scope(request, managed, key_id, "rotate")
    await _may_write(request, managed)
    _, after, token = await _key_change(K.rotate, managed.store, key_id, float(grace), actor_of(request))
    await _read_back(managed)
    return json_response({**K.public(after), "secret": token})
