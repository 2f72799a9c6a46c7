"""Applying a config text as the next version: validated like a new file, swapped in whole,
written back over the config file. Rollbacks and runtime deployment changes go through it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from edgeroute import config as config_mod
from edgeroute import reload
from edgeroute.errors import ProxyError
from edgeroute.governance.runtime import GOV, Change
from edgeroute.governance.versions import cannot_write, write_back
from edgeroute.state import STATE
from edgeroute.workers import worker as workers


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

    `text_of` runs once no reload is in progress, so a change made from the running config's
    text (`Versions.running_text`) is made to the config it is applied over: read before a
    SIGHUP's reload that was still being applied, the change undid the reload's edits (an
    admin key's demotion, say) and wrote the file back without them. Callers run it within
    `reload.to_the_end`, their locks with it."""
    async with app[STATE].source_lock:  # no reload reads the file between the two steps
        source = app[STATE].live.source
        if every_worker:
            await _file_takes_it(app.get(workers.WORKER), source)
        text = text_of()
        cfg = await reload.load_off_the_loop(text, source)
        await reload.apply_config(app, cfg, text, how, actor, audit)
        written = await asyncio.to_thread(write_back, source, text)
    if written:  # the other workers of this server read it from there
        workers.ask_siblings_to_reload(app.get(workers.WORKER))
    return written


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
    """Held (inside `Gov.lock`) while a change is made to the running config's text and applied.
    Under a supervisor, across its workers (a file lock in its run directory), and with this
    worker first caught up with the config file: a change made through another worker that it
    had not re-read yet (its SIGHUP still on the way) was undone by a change made here, on the
    text before it."""
    worker = app.get(workers.WORKER)
    if worker is None or worker.count < 2:
        yield
        return
    fd = os.open(worker.dir / "config-edit.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:  # closing the descriptor releases the lock, however this ends
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        text = await asyncio.to_thread(_file_text, app[STATE].live.source)
        if text is not None and text != app[GOV].versions.running_text:
            try:
                await reload.reload_from_source(app, "sighup", "signal:SIGHUP")  # as its SIGHUP will
            except config_mod.ConfigError:
                pass  # a file that does not validate: the change is made to the running config, as alone
        yield
    finally:
        os.close(fd)


def _file_text(source: str) -> str | None:
    p = Path(source)
    try:
        return p.read_text() if p.is_file() else None
    except OSError:
        return None


def refused(status: int, message: str, code: str, e: config_mod.ConfigError) -> ProxyError:
    """A change that cannot be applied, with every problem listed."""
    return ProxyError(
        status, message, code=code, details=[{"error": line} for line in e.errors], details_key="problems"
    )
