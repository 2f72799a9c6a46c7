"""Applying a config text as the next version: validated like a new file, swapped in whole,
written back over the config file. Rollbacks and runtime deployment changes go through it."""

from __future__ import annotations

import asyncio

from aiohttp import web

from edgeroute import config as config_mod
from edgeroute import reload
from edgeroute.errors import ProxyError
from edgeroute.governance.versions import write_back
from edgeroute.state import STATE
from edgeroute.workers import worker as workers


async def apply_text(app: web.Application, text: str, how: str, actor: str) -> bool:
    """Applies `text`; returns whether the config file was updated too. Raises ConfigError
    (and nothing changed) when it does not validate."""
    async with app[STATE].source_lock:  # no reload reads the file between the two steps
        source = app[STATE].live.source
        cfg = config_mod.loads(text, source)
        await reload.apply_config(app, cfg, text, how, actor)
        written = await asyncio.to_thread(write_back, source, text)
    if written:  # the other workers of this server read it from there
        workers.ask_siblings_to_reload(app.get(workers.WORKER))
    return written


def refused(status: int, message: str, code: str, e: config_mod.ConfigError) -> ProxyError:
    """A change that cannot be applied, with every problem listed."""
    return ProxyError(
        status, message, code=code, details=[{"error": line} for line in e.errors], details_key="problems"
    )
