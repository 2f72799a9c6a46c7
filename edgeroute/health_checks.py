"""Active health checks: a periodic cheap probe per provider that has one configured.

Passive checks (every attempt reported to the core) take a failing deployment out;
an active probe takes out deployments whose provider stopped answering before a user
request has to find out, and brings them back as soon as it answers again, instead of
waiting for the ejection to run out. Only a probe that failed since its last good one
brings a deployment back: a provider whose models list answers while its requests fail
(a crashed model behind a healthy gateway) keeps the ejection those requests earned, which
grows with each one. A good probe that never failed says nothing about them; it restored
the deployment every interval, and requests went on trying it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from edgeroute.state import STATE
from edgeroute.upstream_http.errors import UpstreamError

log = logging.getLogger("edgeroute.health")

# How long a failed probe keeps a deployment out (the next good probe ends it early).
PROBE_EJECTION_MS = 60_000
FOLLOW_S = 1.0  # how soon a reload's probe settings take effect


def _verdict(status: int, with_credentials: bool) -> bool | None:
    """What a probe's answer says of the provider: True serving, False not, None nothing.
    A 401 or 403 to a probe that carried our credentials, or a redirect (which edgeroute never
    follows), says nothing either way: a key may be refused the models list and still serve
    requests (OpenAI's project keys scoped without "Models: read"), or the list may have moved
    alone. Counted healthy, they restored every interval the deployments that requests' auth
    errors had taken out; counted failed, a working provider was ejected and, no request
    reaching it, never came back. Requests so refused fail over and take it out themselves."""
    if (with_credentials and status in (401, 403)) or 300 <= status < 400:
        return None
    return status < 300 or (400 <= status < 500 and status != 429)


async def probe_once(app: web.Application, provider: str, failing: set[str]) -> bool:
    """Probes `provider` once; `failing` holds the providers whose last probe failed (the
    only ones a good probe restores), updated here."""
    live = app[STATE].live
    up = live.upstreams.get(provider)
    settings = live.config.providers.get(provider)
    hc = settings.health_check if settings is not None else None
    if up is None or hc is None:  # a reload took the provider or its probe away
        return True
    headers = up.adapter.health_headers()
    verdict: bool | None
    try:
        async with asyncio.timeout(hc.timeout):
            async with await up.client.request("GET", up.adapter.health_url(), headers) as r:
                verdict = _verdict(r.status, bool(headers))
    except (TimeoutError, UpstreamError, OSError):
        verdict = False
    if verdict is None:  # neither restores nor ejects (see `_verdict`)
        return provider not in failing
    healthy = verdict
    restore = healthy and provider in failing
    if healthy:
        failing.discard(provider)
    else:
        failing.add(provider)
    for d in live.deployments:
        if d.provider != provider:
            continue
        circuit = live.router.health(d.index)["circuit"]
        if restore and circuit != "closed":
            log.info("deployment %s is answering again; restoring it", d.name)
            live.router.set_probe_result(d.index, True, 0)
        elif not healthy and circuit == "closed":
            log.warning("health check of provider %s failed; ejecting %s", provider, d.name)
            live.router.set_probe_result(d.index, False, PROBE_EJECTION_MS)
    return healthy


async def _loop(app: web.Application, provider: str, interval: float, failing: set[str]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await probe_once(app, provider, failing)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in one probe must not stop the others
            log.exception("health check of %s failed unexpectedly", provider)


async def _follow_config(app: web.Application) -> None:
    """One probe loop per provider with `health_check` set in the running config: a reload that
    adds, changes or removes a probe starts, restarts or stops its loop within `FOLLOW_S` (the
    loops were started once, from the config at start)."""
    loops: dict[str, tuple[float, asyncio.Task[None]]] = {}
    failing: set[str] = set()  # kept across a loop's restart: a reload mid-outage still restores
    try:
        while True:
            providers = app[STATE].live.config.providers
            wanted = {n: p.health_check.interval for n, p in providers.items() if p.health_check is not None}
            for name in [n for n, (interval, _) in loops.items() if wanted.get(n) != interval]:
                loops.pop(name)[1].cancel()
            for name, interval in wanted.items():
                if name not in loops:
                    loops[name] = (interval, asyncio.create_task(_loop(app, name, interval, failing)))
            await asyncio.sleep(FOLLOW_S)
    finally:
        for _, t in loops.values():
            t.cancel()
        await asyncio.gather(*(t for _, t in loops.values()), return_exceptions=True)


async def health_check_ctx(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the probe loops of the running config's providers."""
    task = asyncio.create_task(_follow_config(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
