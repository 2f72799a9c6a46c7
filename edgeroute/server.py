"""The aiohttp application: middleware, health and admin endpoints, lifecycle.

Owns how errors look (OpenAI's JSON format, never a traceback), load shedding,
client authentication, and start-up / graceful drain. Endpoint logic lives in
`openai_api.py`; upstream I/O in `dispatch/`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edgeroute import (
    anthropic_api,
    background,
    capacity_share,
    endpoints,
    health_share,
    learning,
    learning_share,
    looplag,
    memory,
    openai_api,
    reload_signal,
    shadow,
    sidecar_guard,
    ui,
)
from edgeroute.accounting import Recorder
from edgeroute.admission import Admission
from edgeroute.cache.service import CACHE, ResponseCache
from edgeroute.cache.service import metrics_source as cache_metrics
from edgeroute.capacity_share import SHARED_SLOTS
from edgeroute.config import Config, ConfigError
from edgeroute.cost import app as cost_app
from edgeroute.cost import ledger_lock
from edgeroute.cost.keys import IDENTITY, MANAGED_KEYS, PUBLIC_PATHS, NotYetRead, tenant_of
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.store_errors import StoreUnavailable
from edgeroute.dispatch import STREAM_STARTED, senders
from edgeroute.errors import ProxyError, StartError, body_read_error, error_body
from edgeroute.governance import app as governance_app
from edgeroute.governance.keys import ManagedKeys
from edgeroute.health_checks import health_check_ctx
from edgeroute.http_server import ProxyServer
from edgeroute.leases import SharedSlots
from edgeroute.metrics import METRICS
from edgeroute.reload import admin_reload, reload_from_source
from edgeroute.request_input import read_body
from edgeroute.router_shadow import evaluator as router_shadow
from edgeroute.state import RECORDER, STATE, Counters, Live, ServerState
from edgeroute.telemetry import app as telemetry
from edgeroute.telemetry import logs
from edgeroute.words import counted
from edgeroute.workers import peers
from edgeroute.workers import worker as workers
from edgeroute.workers.supervisor import cannot_listen
from edgeroute.workers.worker import WORKER

log = logging.getLogger("edgeroute")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GC_THRESHOLDS = (10_000, 10, 10)


# Errors after which the rest of the request cannot be read in step: the connection is closed.
_OUT_OF_STEP = frozenset({"body_timeout", "malformed_request"})


def _json_error(e: ProxyError) -> web.Response:
    resp = web.Response(status=e.status, body=e.body(), content_type="application/json", headers=e.headers)
    if e.code in _OUT_OF_STEP:
        resp.force_close()
    return resp


@web.middleware
async def front_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware every request passes (one layer, not four: it runs per request):
    client authentication and load shedding (`_admitted`), errors as JSON, and Anthropic's
    error format for its clients."""
    path = request.path
    try:
        resp = await (handler(request) if path in PUBLIC_PATHS else _admitted(request, handler))
    except ProxyError as e:
        resp = _json_error(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {
            404: f"Unknown request URL: {request.method} {path}.",
            405: f"Method {request.method} is not allowed for {path}.",
        }.get(e.status, e.reason)
        # A 405 says which methods the path takes (RFC 9110 requires it); aiohttp's exception had it.
        allow = e.headers.get("Allow")
        resp = web.Response(
            status=e.status,
            body=error_body(e.status, msg),
            content_type="application/json",
            headers=None if allow is None else {"Allow": allow},
        )
    except HttpProcessingError as e:
        # A body that could not be read (a bad chunk, or late): the client's fault, never a
        # traceback; the connection is closed after.
        resp = _json_error(body_read_error(e))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, path)
        if request.get(STREAM_STARTED):
            raise  # a stream is under way: a second response would be spliced into it; drop the connection
        resp = web.Response(
            status=500, body=error_body(500, "Internal error in edgeroute."), content_type="application/json"
        )
    return anthropic_api.rewrite_error(resp) if anthropic_api.anthropic_client(path, request.headers) else resp


async def _admitted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identifies the client (keys are checked against the running config generation, so a
    reload revokes them), then caps in-flight requests: above the cap, 503 at once instead
    of queueing."""
    state = request.app[STATE]
    try:
        ident = state.live.access.identify(request)
    except NotYetRead as miss:  # a managed key made on another instance a moment ago: read, look again
        ident = await state.live.access.identify_after_read(request, miss)
    if ident is not None:
        request[IDENTITY] = ident
    c = state.counters
    server = state.live.config.server
    body = _body_bytes(request, server.max_body_bytes)
    if body == server.max_body_bytes and (request.content_length or 0) > body and _identity(request):
        # Declared past the limit: refused before a byte of it is read (it was read up to the
        # limit first, 10 MiB of the client's upload and of the event loop's time).
        raise ProxyError(
            413, f"The request body is too large (limit {server.max_body_bytes} bytes).", code="request_too_large"
        )
    if c.in_flight >= server.max_in_flight or (
        body and c.body_bytes and c.body_bytes + body > server.max_body_bytes_in_flight
    ):
        c.shed += 1
        raise ProxyError(
            503, "edgeroute is at capacity; retry shortly.", code="overloaded", headers={"Retry-After": "1"}
        )
    holder = ident.key if ident is not None and body else None
    if holder is not None:
        _within_share(c, holder, body, server.max_body_bytes_in_flight)
        c.body_bytes_by[holder] = c.body_bytes_by.get(holder, 0) + body
    c.in_flight += 1
    c.requests += 1
    c.body_bytes += body
    try:
        return await handler(request)
    finally:
        c.in_flight -= 1
        c.body_bytes -= body
        if holder is not None:
            if (left := c.body_bytes_by[holder] - body) > 0:
                c.body_bytes_by[holder] = left
            else:
                del c.body_bytes_by[holder]


def _within_share(c: Counters, holder: str, body: int, cap: int) -> None:
    """Once request bodies hold half of `server.max_body_bytes_in_flight`, a key that holds a
    quarter of it already gets no more: a tenant trickling bodies it declared large (one byte
    every few seconds, never admitted, so no RPM or budget is spent) held the whole of it, and
    every other tenant's larger requests were refused as at capacity. A key alone on an idle
    server may still use more; a request alone always passes, as for the cap itself."""
    held = c.body_bytes_by.get(holder, 0)
    if held and held + body > cap // 4 and c.body_bytes + body > cap // 2:
        c.shed += 1
        raise ProxyError(
            429,
            "This key's request bodies in flight hold its share of edgeroute's room for bodies; "
            "retry once some are sent.",
            code="body_bytes_in_flight",
            headers={"Retry-After": "1"},
        )


def _identity(request: web.Request) -> bool:
    """Whether the body is sent as it is (its Content-Length is its size once read)."""
    encoding = request.headers.get("Content-Encoding")
    return encoding is None or encoding.strip().lower() == "identity"


def _body_bytes(request: web.Request, limit: int) -> int:
    """The body a request will hold, for `server.max_body_bytes_in_flight`: its Content-Length,
    or the limit when it may grow to that (chunked, or compressed). Before any of it is read:
    a hundred clients sending 8 MB bodies at once held 2.9 GB of the proxy (about four times
    each body while it is parsed and sent on); a few hundred more would have it killed."""
    if not request.body_exists:
        return 0
    length = request.content_length
    if length is None or not _identity(request):
        return limit
    return min(length, limit)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    live = state.live
    usable = [d.name for d in live.deployments if live.router.health(d.index)["circuit"] != "open"]
    # A ledger that cannot write (a full disk, a read-only file, the database down) holds every
    # record since in memory, all lost to a kill -9: spend is not being kept, so not ready.
    ledger = request.app.get(RECORDER)
    failing = ledger.failing_since if isinstance(ledger, Ledger) else None
    lock_lost = ledger_lock.lost()
    # Keys not read from their store past the bound are refused: this instance cannot serve them.
    keys = request.app.get(MANAGED_KEYS)
    keys_stale = keys.stale_for() if isinstance(keys, ManagedKeys) else None
    ready = bool(usable) and not state.draining and failing is None and lock_lost is None and keys_stale is None
    body: dict[str, object] = {
        "ready": ready,
        "draining": state.draining,
        "usable_deployments": len(usable),
        "deployments": len(live.deployments),
    }
    if isinstance(ledger, Ledger) and failing is not None:
        since = round(time.monotonic() - failing, 1)
        why = ledger.failing_why() or "it has just written"  # a write that raised, or one that hangs
        body["ledger"] = {
            "writing": False,
            "failing_for_s": since,
            "unwritten_records": ledger.queue_depth(),
            "why": why,
        }
    if lock_lost is not None:
        body["ledger_lock"] = {"held": False, "why": lock_lost}
    if keys_stale is not None:
        why = "the managed keys cannot be read from the database; requests with them are refused"
        body["key_store"] = {"reachable": False, "last_read_s_ago": round(keys_stale, 1), "why": why}
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json")


async def admin_deployments(request: web.Request) -> web.Response:
    live = request.app[STATE].live
    out = []
    # A team's key is told whether a deployment is ejected for its own team alone (the count of
    # senders it is ejected for names none of them).
    team = tenant_of(request)
    sender = senders.sender_of(team, None) if team else None
    for d in live.deployments:
        h: dict[str, object] = {**live.router.health(d.index)}
        h["trips_withheld"] = h["sender_ejections"]  # deprecated alias (session 29's field)
        if sender is not None:
            h["ejected_for_you"] = live.router.ejected_for(d.index, sender)
        spec = live.config.deployments[d.name]
        cap, i = live.capacity, d.index
        slots = {"max_concurrency": cap.limits[i], "active": cap.active(i), "queued": cap.waiting(i),
                 "reserve_percent": spec.reserve_percent}  # fmt: skip
        out.append({"name": d.name, "provider": d.provider, "model": d.model, "weight": spec.weight,
                    "drained": spec.drained, "tags": spec.tags, **h, **slots})  # fmt: skip
    if (shared := request.app.get(SHARED_SLOTS)) is not None:
        # The fleet's counts asked together: with the store down, one timeout, not one per deployment.
        limited = [row for row in out if row["max_concurrency"] is not None]
        counts = await asyncio.gather(*(_fleet_active(shared, str(row["name"])) for row in limited))
        for row, n in zip(limited, counts, strict=True):
            row["fleet_active"] = n
    body: dict[str, object] = {"deployments": out}
    if (worker := request.app.get(WORKER)) is not None and worker.count > 1:
        # Health, latency and counts are this worker's own (per process, on purpose): say whose,
        # or an operator's view changed with each connection for no visible reason.
        body["worker"] = worker.id
        body["workers"] = worker.count
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _fleet_active(shared: SharedSlots, deployment: str) -> int | None:
    """In flight on `deployment` across every instance or worker sharing its capacity (the
    shared store's leases); None when the store cannot say."""
    try:
        return await shared.store.count(deployment)
    except StoreUnavailable:
        return None


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    live = app[STATE].live
    # Any config may need to count tokens (a stream that carries no usage, token limits):
    # build the lookup tables (~14 MB, tens of ms) once before serving, so memory is stable from the
    # start and no request pays for the load.
    await asyncio.to_thread(live.router.warm_up)
    await app[CACHE].warm_up([m.cache for m in live.config.models.values() if m.cache is not None])

    async def follow_price_windows() -> None:
        # Whatever the config at start: a reload may add windows (a no-op for a config without).
        while True:  # windows open and close on the minute
            await asyncio.sleep(60 - time.time() % 60 + 0.05)
            app[STATE].live.apply_price_windows()

    windows = asyncio.create_task(follow_price_windows())
    yield
    windows.cancel()
    await asyncio.gather(windows, return_exceptions=True)
    state = app[STATE]
    state.draining = True
    await app[CACHE].close()
    for task in list(state.background):
        task.cancel()
    await asyncio.gather(*state.background, return_exceptions=True)
    for up in state.live.upstreams.values():
        await up.close()


def _response_cache(config: Config) -> ResponseCache:
    shared = config.shared_state
    redis = (shared.redis_url, shared.prefix, shared.timeout_ms) if shared else None
    return ResponseCache.build(config.cache, redis, config.learning.experiment_salt)


# The admin API's and the console's JSON (keys, audit, stored prompts and answers) is never kept
# by a browser or a cache, nor read as another type: what `/ui/session` already sent (redU L5).
# Nor framed (X-Frame-Options for browsers without CSP frame-ancestors), nor named in a Referer.
_ADMIN_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """`Server: edgeroute`, not aiohttp's default (the Python and aiohttp versions: a map of
    which published flaws apply); `_ADMIN_HEADERS` on every /admin answer and the console's
    JSON (one prefix check for the rest: the /v1 path gets nothing more)."""
    response.headers["Server"] = "edgeroute"
    path = request.path
    if path.startswith("/admin/") or (path.startswith("/ui") and response.content_type == "application/json"):
        for name, value in _ADMIN_HEADERS.items():
            response.headers.setdefault(name, value)  # the console's own (stricter) stay


def create_app(
    config: Config, source: str = "<config>", recorder: Recorder | None = None, admission: Admission | None = None
) -> web.Application:
    """Builds the proxy application for a validated config."""
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[front_middleware])
    app[STATE] = ServerState(Live.build(config, source))
    # Recorder (ledger), admission (budgets, rate limits), /admin/spend and their cleanup, from config.
    cost_app.install(app, config, source, recorder, admission)
    telemetry.install(app, config)
    looplag.install(app)
    health_share.install(app, config)  # ejections shared between instances (with shared_state)
    capacity_share.install(app, config)  # max_concurrency across instances or workers
    app[CACHE] = _response_cache(config)
    app[CACHE].bind_embedders(lambda: (app[STATE].live.config, app[STATE].live.upstreams))
    app[METRICS].sources.append(cache_metrics)
    base_dir = Path(source).parent if not source.startswith("<") else None
    learning.install(app, config, base_dir, read_body)
    learning_share.install(app, config)  # posteriors shared between instances (with shared_state)
    router_shadow.install(app, config, source)  # a candidate router evaluated on live traffic
    governance_app.install(app, config, source)  # keys, config versions, audit (after the ledger's tables)
    shadow.install(app, config, base_dir)  # mirrors' bound and skip counts, the shadow log
    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(health_check_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/deployments", admin_deployments)
    app.router.add_post("/admin/reload", admin_reload)
    ui.install(app)
    openai_api.add_routes(app)
    anthropic_api.add_routes(app, endpoints.messages.handle)  # Anthropic-only fields passed through
    endpoints.install(app)  # embeddings, legacy completions, responses
    return app


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; Windows lacks it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def warn_if_open(config: Config, host: str) -> None:
    """Logs a warning when a keyless server listens beyond loopback: its `Host` checks stop
    web pages, not programs, so any client that reaches the port may spend on the upstreams."""
    keyless = not config.keys and not config.server.api_keys and not config.governance.managed_keys
    if keyless and not sidecar_guard.is_loopback_host(host):
        log.warning(
            "no keys are configured and edgeroute listens on %s: any program that reaches this port "
            "may call the upstreams at your expense (set server.api_keys or keys, or listen on 127.0.0.1)",
            host,
        )


async def serve_async(
    config: Config,
    source: str,
    host: str | None = None,
    port: int | None = None,
    print_fn: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serves until `stop` is set (or SIGINT/SIGTERM), then drains: stop accepting, let
    in-flight requests and streams finish up to `server.drain_timeout`, flush, return."""
    memory.return_large_blocks()  # a flood of large bodies leaves no lasting growth
    worker = workers.current()
    try:
        app = create_app(config, source)
    except StartError as e:
        raise SystemExit(f"edgeroute: {e}") from None
    if worker is not None:
        app[WORKER] = worker
    server = ProxyServer(app, config)
    await server.setup()
    # Before it listens and says so: a SIGTERM or Ctrl-C sent as soon as "listening" is printed
    # (a script, a supervisor) must drain, not kill the process or raise KeyboardInterrupt.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    h = host or config.server.host
    p = port if port is not None else config.server.port
    # Under `--workers`, every worker binds the supervisor's port; the kernel spreads connections.
    try:
        await server.listen(h, p, reuse_port=worker is not None)
    except OSError as e:
        await server.cleanup()
        raise SystemExit(cannot_listen(h, p, e)) from None
    # Everything loaded so far (config, modules, tables) lives as long as the process.
    # Freezing it keeps the collector from walking it again: otherwise each full
    # collection stalls the event loop for tens of milliseconds (measured 34 ms, the
    # proxy's p99.9 at 1,000 req/s).
    gc.collect()
    gc.freeze()
    # A request allocates hundreds of short-lived objects: with the default threshold (700)
    # the young generation is collected several times per request. A larger one collects the
    # same garbage in fewer passes; not much larger, as a pass walks every survivor (10,000
    # objects: ~0.2 ms, 50,000: over 1 ms, a stall in the p99).
    gc.set_threshold(*GC_THRESHOLDS)
    trimmer = loop.create_task(memory.keep_trimmed())  # a burst's freed heap goes back to the kernel
    if worker is None or worker.id == 0:  # once a server, whatever its workers
        warn_if_open(config, h)
    if print_fn and worker is None:  # under a supervisor, it says when all workers listen
        models, deps = counted(len(config.models), "model"), counted(len(config.deployments), "deployment")
        # Port 0 asks for any free port: say which one it is.
        print_fn(f"edgeroute listening on http://{h}:{p or server.port} ({models}, {deps})")

    def on_hup() -> None:
        async def go() -> None:
            try:
                await reload_from_source(app, "sighup", "signal:SIGHUP")
                if print_fn:
                    print_fn(f"edgeroute reloaded {source}")
            except ConfigError as e:
                log.error("reload rejected, keeping the running config:\n%s", "\n".join(e.errors))
            except Exception:
                log.exception("reload failed, keeping the running config")

        task = loop.create_task(go())
        app[STATE].background.add(task)
        task.add_done_callback(app[STATE].background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if reload_signal.take():  # asked while this server was starting (`serve` notes it)
        on_hup()
    # Ready for the supervisor only now: a SIGHUP it forwards must find the handler.
    own_metrics = await peers.join(worker, lambda: app[METRICS].own_body(app)) if worker is not None else None
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        # Draining: a reload asked now (a sibling's request, a `kill -HUP`) must not end the
        # process, as SIGHUP's default action would, cutting the streams it is finishing.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Nor the stop asked again: systemd signals every process of the service (and the
        # supervisor relays its own), a terminal's Ctrl-C reaches the whole process group, an
        # operator sends a second `kill`. With SIGTERM's default action back, that killed the
        # process mid-drain: the streams cut, the finished requests the ledger had not written
        # yet lost. The drain is bounded by `server.drain_timeout`; SIGKILL ends it at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _already_draining, print_fn)
        app[STATE].begin_drain(app[STATE].live.config.server.drain_timeout)
        if print_fn:
            print_fn("edgeroute draining in-flight requests")
        await server.cleanup()
        await background.stop(trimmer)
        if own_metrics is not None:
            await own_metrics.cleanup()


def _already_draining(print_fn: Callable[[str], None] | None) -> None:
    if print_fn:
        print_fn("edgeroute is draining already (up to server.drain_timeout); SIGKILL stops it at once")


def serve(
    config: Config,
    source: str,
    host: str | None = None,
    port: int | None = None,
    print_fn: Callable[[str], None] | None = None,
) -> None:
    """Runs the proxy on uvloop until SIGINT/SIGTERM, then drains and returns."""
    srv = config.server
    logs.setup(srv.log_format, srv.log_level, srv.decision_log)
    install_uvloop()
    if (worker := workers.current()) is not None:
        workers.hold(worker)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked before the handler is set must not end it
    asyncio.run(serve_async(config, source, host, port, print_fn))
