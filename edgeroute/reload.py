"""Config hot reload: validate the new file, swap it in whole, or keep the old one.

A reload builds a new generation (config, compiled router, upstream pools) next to
the running one; only when everything validates is it swapped in, in one assignment.
Requests already running finish on the generation they started with; the old
generation's connection pools close after the drain timeout. The core carries
health state over for deployments whose provider and model did not change.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute import config as config_mod
from edgeroute.errors import ProxyError
from edgeroute.state import STATE, Live

log = logging.getLogger("edgeroute.reload")


async def reload_from_source(app: web.Application) -> Live:
    """Reloads the file the running config came from; raises ConfigError and keeps the old one."""
    state = app[STATE]
    old = state.live
    cfg = config_mod.load(old.source)
    try:
        new = Live.build(cfg, old.source, previous=old)
    except _core.ConfigError as e:
        raise config_mod.ConfigError([f"{old.source}: {e}"]) from None
    state.live = new
    log.info("config reloaded from %s", old.source)

    async def close_old() -> None:
        try:
            await asyncio.sleep(old.config.server.drain_timeout)
        finally:
            for up in old.upstreams.values():
                await up.close()

    task = asyncio.create_task(close_old())
    state.background.add(task)
    task.add_done_callback(state.background.discard)
    return new


async def admin_reload(request: web.Request) -> web.Response:
    try:
        live = await reload_from_source(request.app)
    except config_mod.ConfigError as e:
        raise ProxyError(
            400,
            "The new config is invalid; the running config is unchanged.",
            code="invalid_config",
            details=[{"error": line} for line in e.errors],
            details_key="problems",
        ) from None
    body = {"reloaded": True, "models": list(live.config.models), "deployments": len(live.deployments)}
    return web.Response(body=orjson.dumps(body), content_type="application/json")
