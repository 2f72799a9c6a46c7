"""Applying a config text as the next version: validated like a new file, swapped in whole,
written back over the config file. Rollbacks and runtime deployment changes go through it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from edgeroute import config as config_mod
from edgeroute import reload
from edgeroute.atomic_file import Staged
from edgeroute.errors import ProxyError
from edgeroute.governance.runtime import GOV, Change
from edgeroute.governance.versions import cannot_write, stage_write
from edgeroute.state import STATE
from edgeroute.workers import worker as workers

log = logging.getLogger("edgeroute.governance")


async def apply_text(
    app: web.Application,
    text_of: Callable[[], str],
    how: str,
    actor: str,
    audit: Sequence[Change] = (),
    every_worker: bool = True,
) -> bool:
    """Applies the text `text_of()` makes (audited with `audit` too, as `reload.apply_config`
    does); returns whether the config file was updated too. Raises ConfigError (and nothing
    changed) when it does not validate, and whatever `text_of` raises.

    With `every_worker` (an admin's change), under a supervisor a config file that cannot be
    written is a 409 and nothing changes: the other workers take the change from the file, so
    it reached the answering worker alone (a drain answered 200 while the other workers kept
    sending requests to the deployment). The rollback guard passes False: each worker's guard
    judges its own answers.

    A config file changed since this server applied it (another instance's or worker's change
    to the same file, an edit) is applied first, as a reload would (`_catch_up`), and the change
    is made on it: made on the text this server ran, it overwrote the other change, answered
    200 and audited. One that cannot be applied is a 409 and nothing changes. Callers hold
    `editing`, so no other change to the file comes in between.

    `text_of` runs once no reload is in progress, so a change made from the running config's
    text (`Versions.running_text`) is made to the config it is applied over: read before a
    SIGHUP's reload that was still being applied, the change undid the reload's edits (an
    admin key's demotion, say) and wrote the file back without them. Callers run it within
    `reload.to_the_end`, their locks with it.

    The new text is written and synced beside the file before its version is recorded, and
    renamed over the file right after (`Versions.save`), before the swap: a kill -9 after the
    record no longer leaves the file without the change for the restart to undo."""
    await _catch_up(app, how, actor)
    state, versions = app[STATE], app[GOV].versions
    async with state.source_lock:  # no reload reads the file between the steps
        source = state.live.source
        if every_worker:
            await _file_takes_it(app.get(workers.WORKER), source)
        if await asyncio.to_thread(_changed_on_disk, source, versions.running_text):
            raise _changed_elsewhere(source, "it changed again while this change was made (an edit?)")
        text = text_of()
        cfg = await reload.load_off_the_loop(text, source)
        versions.staged = await asyncio.to_thread(stage_write, source, text)
        try:
            await reload.apply_config(app, cfg, text, how, actor, audit)
        finally:
            staged, versions.staged = versions.staged, None
            if staged is not None:
                await asyncio.to_thread(_settle, staged)
    written = staged is not None and staged.published
    if written:  # the other workers of this server read it from there
        workers.ask_siblings_to_reload(app.get(workers.WORKER))
    return written


def _settle(staged: Staged) -> None:
    """A staged config file not put in place (nothing was recorded) removed; one put in place
    synced (its directory, off the step between the record and the swap)."""
    staged.discard()
    try:
        staged.persist()
    except OSError as e:  # the change is applied and in the file; a power cut may lose the rename
        log.warning("the config file %s was replaced but its directory could not be synced: %s", staged.path, e)


async def _catch_up(app: web.Application, how: str, actor: str) -> None:
    """Applies the config file when it changed since this server applied it; 409 (nothing
    changed) when it cannot be. Under a supervisor as the SIGHUP a sibling sent will (which
    follows the sibling's version, audited once); otherwise as a reload by `actor`, which an
    operator may ask for anyway (`POST /admin/reload`)."""
    source = app[STATE].live.source
    if not await asyncio.to_thread(_changed_on_disk, source, app[GOV].versions.running_text):
        return
    worker = app.get(workers.WORKER)
    under_supervisor = worker is not None and worker.count >= 2
    try:
        if under_supervisor:
            await reload.reload_from_source(app, "sighup", "signal:SIGHUP")
        else:
            await reload.reload_from_source(app, "reload", actor)
    except config_mod.ConfigError as e:
        raise refused(409, _changed_elsewhere(source, "it cannot be applied").message, _CHANGED, e) from None
    log.info("the config file changed since this server applied it: applied it before the %s change", how)


_CHANGED = "config_changed_elsewhere"


def _changed_elsewhere(source: str, why: str) -> ProxyError:
    return ProxyError(
        409,
        f"The config file {source} changed since this server applied it (another instance's change, or an "
        f"edit), and {why}: nothing changed. Fix the file if need be, reload (SIGHUP or POST /admin/reload) "
        "and make the change again.",
        code=_CHANGED,
    )


def _changed_on_disk(source: str, running: str) -> bool:
    """Whether the config file holds other text than `running` and this server may write it.
    One it cannot write is never overwritten: a change made alone stays (`file_updated: false`)
    until the operator reloads, and catching up with the file undid it. One it cannot read or
    decode counts as changed: the catch-up's reload says why, and nothing overwrites it."""
    p = Path(source)
    if not p.is_file() or not os.access(p.parent, os.W_OK | os.X_OK):
        return False
    try:
        return p.read_text(encoding="utf-8") != running
    except (OSError, UnicodeDecodeError):
        return True


async def _file_takes_it(worker: workers.Worker | None, source: str) -> None:
    """409 when the other workers of this server could not read a change from the config file."""
    if worker is None or worker.count < 2:
        return  # alone, a change the file cannot take is applied and said so (`file_updated`)
    if (why := await asyncio.to_thread(cannot_write, source)) is not None:
        raise ProxyError(
            409,
            f"The config file {source} cannot be written ({why}), and the other workers of this server "
            "take a change from it: nothing changed. Change the file and reload (SIGHUP): every worker "
            "applies it.",
            code="config_not_writable",
        )


@contextlib.asynccontextmanager
async def editing(app: web.Application) -> AsyncIterator[None]:
    """Held (inside `Gov.lock`) while a change is made to the running config's text, applied
    and written back: a file lock beside the config file (`.NAME.edit.lock`), taken by every
    instance and worker that edits that file, so that each makes its change on the file as the
    one before left it (`apply_text` catches up with it). Two instances sharing a file each
    wrote their change over the other's. Under a supervisor whose config directory cannot be
    written, its run directory's lock (no change is written back there)."""
    fd = await asyncio.to_thread(_lock_fd, app[STATE].live.source, app.get(workers.WORKER))
    if fd is None:  # a file nobody can write: no change is written back to it
        yield
        return
    try:  # closing the descriptor releases the lock, however this ends
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock_fd(source: str, worker: workers.Worker | None) -> int | None:
    p = Path(source)
    where = [p.with_name(f".{p.name}.edit.lock")] if p.is_file() else []
    if worker is not None and worker.count >= 2:
        where.append(worker.dir / "config-edit.lock")
    for path in where:
        try:  # read-only and 0644: an instance run as another user locks it too; empty, it holds nothing
            return os.open(path, os.O_CREAT | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
    return None


def refused(status: int, message: str, code: str, e: config_mod.ConfigError) -> ProxyError:
    """A change that cannot be applied, with every problem listed."""
    return ProxyError(
        status, message, code=code, details=[{"error": line} for line in e.errors], details_key="problems"
    )
