"""A fault-injecting OpenAI upstream, for users and for the uptime test suite.

It answers like :class:`edgeroute.bench.upstream.MockUpstream` (OpenAI's wire format, JSON or
SSE) unless a fault mode applies. Modes (:data:`MODES`)::

    ok            a normal answer
    refuse        stop listening and reset open connections (connection refused)
    hang          accept the request, never send headers (until `hang_s` or disconnect)
    500 502 503   answer that status with an OpenAI error body
    429           answer 429 with `Retry-After: <retry_after>` (default "1")
    stall         send headers and `after` content chunks (default 2), then go silent
    reset         send headers and `after` chunks, then reset the connection (RST)
    malformed     200 with a body (or stream event) that is not valid JSON
    error_event   200 whose stream holds only an error event (JSON: a 200 error body)
    no_done       a stream that ends cleanly but without `data: [DONE]`
    slow          a normal answer after `delay_ms` (default 1000) before headers

Which mode applies to a request, first match wins:

1. the request's own header ``x-fault: <mode> [k=v ...]`` (e.g. ``x-fault: reset after=3``);
   edgeroute does not forward client headers upstream, so through the proxy use 2.;
2. the current *phase*: set by :meth:`FaultUpstream.set_mode` or ``POST /_fault``
   ``{"mode": "503", "count": 3, "seconds": null, "params": {}}``, it applies to the
   next `count` requests and/or for `seconds`, then the server returns to its default;
   :meth:`FaultUpstream.push` / ``{"then": true, ...}`` queue a phase after the current one;
3. the server default (``FaultUpstream(default=...)``, ``--default``, or ``{"default": ...}``).

`refuse` sees no requests, so `count` cannot end it: end it with `seconds`, a new
mode, or :meth:`clear`. Its admin endpoint dies with the port, so the CLI can also
serve the admin API on ``--admin-port``.

Python API (in the test's event loop)::

    up = FaultUpstream()               # port 0: a free port on 127.0.0.1
    await up.start(); up.url           # "http://127.0.0.1:PORT/v1" for a provider base_url
    up.set_mode("503", count=2)        # the next two chat requests get 503
    up.set_mode("reset", after=1)      # every request until changed: one chunk, then RST
    up.clear()                         # back to the default (listening again if refused:
    await up.settled()                 #   this waits until the port is open again)
    up.requests; up.by_mode            # chat requests received, in total and per mode applied
    up.connections                     # TCP connections accepted
    await up.stop()

or from synchronous code, on its own loop in a thread::

    with FaultUpstream.threaded() as bg:   # a BackgroundServer
        bg.server.url; bg.call_soon(lambda: bg.server.set_mode("hang"))

Admin HTTP API on the same port (and on ``--admin-port``): ``GET /_fault`` (state and
counters), ``POST /_fault`` (set a phase or the default), ``DELETE /_fault`` (clear
the phase and counters). CLI: ``python -m edgeroute.bench.faults --port 9000 --default ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgeroute.bench import provider_mock
from edgeroute.bench.http1 import Conn, HttpServer, Request
from edgeroute.bench.upstream import BackgroundServer, Latency, MockUpstream, UpstreamOptions, error_json

MODES = (
    "ok", "refuse", "hang", "500", "502", "503", "429", "stall", "reset",
    "malformed", "error_event", "no_done", "slow",
)  # fmt: skip
FAULT_HEADER = "x-fault"
ADMIN_PATH = "/_fault"


@dataclass(slots=True)
class Phase:
    mode: str
    count: int | None = None  # requests left; None: unbounded
    seconds: float | None = None  # duration once current; None: unbounded
    params: dict[str, Any] = field(default_factory=dict)
    until: float | None = None  # monotonic time at which it ends, set when it becomes current

    def expired(self, now: float) -> bool:
        return (self.count is not None and self.count <= 0) or (self.until is not None and now >= self.until)


def parse_fault_header(value: str) -> tuple[str, dict[str, Any]]:
    """``"reset after=3"`` -> ``("reset", {"after": 3})``."""
    mode, *rest = value.split()
    params: dict[str, Any] = {}
    for item in rest:
        k, _, v = item.partition("=")
        try:
            params[k] = float(v) if "." in v else int(v)
        except ValueError:
            params[k] = v
    return mode, params


class FaultUpstream(MockUpstream):
    """A :class:`MockUpstream` that injects the faults described in this module's docstring."""

    def __init__(
        self,
        options: UpstreamOptions | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        default: str = "ok",
        default_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(options, port, host)
        _check(default)
        self.default = Phase(default, params=dict(default_params or {}))
        self.phases: deque[Phase] = deque()
        self.by_mode: dict[str, int] = {}
        self._release: asyncio.Event | None = None  # created on the loop, see _release_event
        self._admin_conn: Conn | None = None  # spared when `refuse` resets connections
        self._refuse_timer: asyncio.TimerHandle | None = None
        self._resuming: asyncio.Task[None] | None = None

    @classmethod
    def threaded(cls, **kwargs: Any) -> BackgroundServer[FaultUpstream]:
        """A FaultUpstream on its own event loop in a thread (started by `with` or `.start()`)."""
        return BackgroundServer(cls(**kwargs))

    @property
    def connections(self) -> int:
        return self.http.connections_accepted

    async def start(self) -> int:
        port = await super().start()
        self._apply_listening()
        return port

    async def stop(self) -> None:
        self._wake_hung()
        if self._refuse_timer is not None:
            self._refuse_timer.cancel()
        await super().stop()

    # -- control -------------------------------------------------------------

    def set_mode(self, mode: str, count: int | None = None, seconds: float | None = None, **params: Any) -> None:
        """Replaces any queued phases with this one (see the module docstring)."""
        self.phases.clear()
        self.push(mode, count, seconds, **params)

    def push(self, mode: str, count: int | None = None, seconds: float | None = None, **params: Any) -> None:
        """Queues a phase after the current ones."""
        _check(mode)
        self.phases.append(Phase(mode, count, seconds, params))
        if len(self.phases) == 1:
            self._begin(self.phases[0])
        self._wake_hung()
        self._apply_listening()

    def set_default(self, mode: str, **params: Any) -> None:
        _check(mode)
        self.default = Phase(mode, params=params)
        self._apply_listening()

    def clear(self) -> None:
        """Drops all phases: back to the default mode (and listening, unless the default is refuse)."""
        self.phases.clear()
        self._wake_hung()
        self._apply_listening()

    def reset_counters(self) -> None:
        self.requests = 0
        self.by_mode = {}
        self.http.connections_accepted = 0

    def current(self) -> Phase:
        now = time.monotonic()
        while self.phases and self.phases[0].expired(now):
            self.phases.popleft()
            if self.phases:
                self._begin(self.phases[0])
        return self.phases[0] if self.phases else self.default

    def state(self) -> dict[str, Any]:
        cur = self.current()
        return {
            "mode": cur.mode,
            "remaining": cur.count,
            "seconds_left": None if cur.until is None else max(0.0, cur.until - time.monotonic()),
            "params": cur.params,
            "queued": len(self.phases),
            "default": self.default.mode,
            "listening": self.http.listening,
            "requests": self.requests,
            "by_mode": self.by_mode,
            "connections": self.connections,
            "streams_open": self.streams_open,
        }

    def _begin(self, phase: Phase) -> None:
        # A phase's clock starts when it becomes current.
        if phase.seconds is not None and phase.until is None:
            phase.until = time.monotonic() + phase.seconds
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                if self._refuse_timer is not None:
                    self._refuse_timer.cancel()
                self._refuse_timer = loop.call_later(phase.until - time.monotonic() + 0.001, self._apply_listening)

    def _apply_listening(self) -> None:
        refuse = self.current().mode == "refuse"
        if refuse and self.http.listening:
            self.http.stop_listening()
            self.http.reset_connections(keep=self._admin_conn)
        elif not refuse and not self.http.listening and self.http.port:
            if self._resuming is not None and not self._resuming.done():
                return
            with contextlib.suppress(RuntimeError):
                self._resuming = asyncio.get_running_loop().create_task(self._resume())

    async def settled(self) -> None:
        """Waits until the listening state matches the mode (after leaving `refuse`, the port is open again)."""
        self.current()
        self._apply_listening()
        if self._resuming is not None:
            await self._resuming

    async def _resume(self) -> None:
        if not self.http.listening and self.current().mode != "refuse":
            await self.http.start()

    def _release_event(self) -> asyncio.Event:
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    def _wake_hung(self) -> None:
        # Requests hung or stalled under the previous mode are released (their connections closed).
        if self._release is not None:
            self._release.set()
            self._release = None

    # -- requests ------------------------------------------------------------

    async def handle(self, req: Request, conn: Conn) -> None:
        path = req.path.split("?", 1)[0]
        if path == ADMIN_PATH:
            admin(self, req, conn)
            return
        await super().handle(req, conn)

    async def chat(self, req: Request, conn: Conn) -> None:
        header = req.headers.get(FAULT_HEADER)
        if header:
            mode, params = parse_fault_header(header)
        else:
            phase = self.current()
            mode, params = phase.mode, phase.params
            if phase.count is not None:
                phase.count -= 1
        self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
        if mode == "ok":
            await super().chat(req, conn)
            return
        body = self.parse_chat(req, conn)
        if body is None:
            return
        await self.inject(mode, params, req, conn, body)

    async def inject(self, mode: str, params: dict[str, Any], req: Request, conn: Conn, body: dict[str, Any]) -> None:
        stream = bool(body.get("stream"))
        if mode == "refuse":
            conn.abort()
        elif mode == "hang":
            await self._hold(conn, params.get("hang_s"))
        elif mode in ("500", "502", "503"):
            status = int(mode)
            conn.respond(status, error_json(status, f"Injected fault: HTTP {status}."))
        elif mode == "429":
            conn.respond(
                429,
                error_json(429, "Rate limit reached (injected).", "rate_limit_exceeded"),
                headers=[("Retry-After", str(params.get("retry_after", "1")))],
            )
        elif mode in ("stall", "reset"):
            await self.answer(req, conn, body, stop_after=int(params.get("after", 2)))
            if mode == "reset":
                await asyncio.sleep(float(params.get("delay_s", 0.0)))
                conn.abort()
            else:
                await self._hold(conn, params.get("hang_s"))
        elif mode == "malformed":
            if stream:
                conn.start(200)
                conn.chunk(b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": "x"\n\n')
                conn.chunk(b"data: [DONE]\n\n")
                conn.end()
            else:
                conn.respond(200, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [')
        elif mode == "error_event":
            err = error_json(500, "The server had an error while processing your request (injected).")
            if stream:
                conn.start(200)
                conn.chunk(b"data: " + err + b"\n\n")
                conn.end()
            else:
                conn.respond(200, err)
        elif mode == "no_done":
            await self.answer(req, conn, body, done=False)
        elif mode == "slow":
            await asyncio.sleep(float(params.get("delay_ms", 1000)) / 1000)
            await self.answer(req, conn, body)
        else:  # pragma: no cover - _check rejects unknown modes at the API; a header may name anything
            conn.respond(400, error_json(400, f"Unknown fault mode {mode!r}; one of {', '.join(MODES)}."))

    async def _hold(self, conn: Conn, hang_s: Any) -> None:
        """Goes silent until `hang_s`, the mode changes, the client leaves, or the server stops."""
        ev = self._release_event()
        deadline = None if hang_s is None else time.monotonic() + float(hang_s)
        while not conn.closed and not ev.is_set():
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), left)
        conn.close()
        conn.keep_alive = False


def _check(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(MODES)}")


def admin(up: FaultUpstream, req: Request, conn: Conn) -> None:
    """``GET/POST/DELETE /_fault``; see the module docstring."""
    if req.method == "GET":
        conn.respond(200, orjson.dumps(up.state()))
        return
    if req.method == "DELETE":
        up.clear()
        up.reset_counters()
        conn.respond(200, orjson.dumps(up.state()))
        return
    if req.method != "POST":
        conn.respond(405, error_json(405, "Use GET, POST or DELETE."))
        return
    up._admin_conn = conn
    try:
        cmd = orjson.loads(req.body or b"{}")
        if not isinstance(cmd, dict):
            raise ValueError("expected a JSON object")
        params = dict(cmd.get("params") or {})
        if "default" in cmd:
            up.set_default(str(cmd["default"]), **params)
        if "mode" in cmd:
            fn = up.push if cmd.get("then") else up.set_mode
            fn(str(cmd["mode"]), cmd.get("count"), cmd.get("seconds"), **params)
        if cmd.get("reset_counters"):
            up.reset_counters()
    except (ValueError, TypeError, orjson.JSONDecodeError) as e:
        conn.respond(400, error_json(400, str(e)))
        return
    finally:
        up._admin_conn = None
    if not up.http.listening:
        conn.keep_alive = False
    conn.respond(200, orjson.dumps(up.state()))


class AdminServer:
    """The admin API alone, on its own port, so that it outlives a `refuse` phase."""

    def __init__(self, target: FaultUpstream, port: int, host: str = "127.0.0.1") -> None:
        self.target = target
        self.http = HttpServer(self.handle, host, port)

    async def handle(self, req: Request, conn: Conn) -> None:
        if req.path.split("?", 1)[0] == ADMIN_PATH:
            admin(self.target, req, conn)
        else:
            conn.respond(404, error_json(404, "Only /_fault is served on the admin port."))


def build_parser(prog: str = "python -m edgeroute.bench.faults") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="A mock OpenAI upstream with fault injection; --kind anthropic, gemini or azure "
        "serves that provider's API instead (--host, --port, --api-key and --tokens apply to every kind).",
    )
    p.add_argument(
        "--kind", default="openai", choices=provider_mock.KINDS,
        help="the provider's API to speak, as a provider's kind: in a config (default: openai)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    p.add_argument("--admin-port", type=int, help="also serve /_fault here (survives `refuse`)")
    p.add_argument("--default", default="ok", choices=MODES, help="mode when no phase or header applies")
    p.add_argument("--latency", default="0", help="ms before headers: 5 | normal:50,10 | lognormal:50,1")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per answer")
    p.add_argument("--tps", type=float, default=0.0, help="stream tokens per second (0: all at once)")
    p.add_argument(
        "--error-rate", type=float, default=0.0, help="share of answers that fail with --error-status (0..1)"
    )
    p.add_argument("--error-status", type=int, default=500, help="the status of those failures (default: 500)")
    p.add_argument("--rate-limit-rate", type=float, default=0.0, help="share of answers that are a 429 (0..1)")
    p.add_argument("--api-key", help="answer 401 unless a request sends this key (default: any)")
    p.add_argument("--seed", type=int, help="seed the random failures (default: unseeded)")
    return p


def options_from(args: argparse.Namespace) -> UpstreamOptions:
    return UpstreamOptions(
        latency=Latency.parse(args.latency), tokens=args.tokens, tokens_per_s=args.tps, error_rate=args.error_rate,
        error_status=args.error_status, rate_limit_rate=args.rate_limit_rate, api_key=args.api_key, seed=args.seed,
    )  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    up = FaultUpstream(options_from(args), args.port, args.host, default=args.default)
    port = await up.start()
    extra = ""
    if args.admin_port is not None:
        adm = AdminServer(up, args.admin_port, args.host)
        extra = f" admin={await adm.http.start()}"
    # One line on stdout, parsed by the scenarios: "listening port=N [admin=M]".
    print(f"listening port={port}{extra}", flush=True)
    print(provider_mock.base_url_note("openai", args.host, port), file=sys.stderr, flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    run = serve
    if args.kind != "openai":
        provider_mock.check_flags(args, parser)
        run = provider_mock.serve
    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            asyncio.run(run(args))
        else:
            uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
