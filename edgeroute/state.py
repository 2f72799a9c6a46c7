"""The server's live state: config, compiled router, upstreams; swapped whole on reload."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from edgeroute import redact
from edgeroute.accounting import Recorder, RequestRecord
from edgeroute.capacity import Capacity
from edgeroute.config import Config
from edgeroute.core import Router, build_router
from edgeroute.cost.keys import Access
from edgeroute.errors import ProxyError
from edgeroute.governance import drain, residency
from edgeroute.governance.guard import GenerationStats
from edgeroute.upstream import DeploymentInfo, Upstream, deployment_table, make_upstreams


@dataclass(slots=True, eq=False)  # a generation is itself (kept in sets by identity)
class Live:
    """One generation of config; requests hold on to the generation they started with."""

    config: Config
    router: Router
    upstreams: dict[str, Upstream]
    deployments: list[DeploymentInfo]
    source: str = "<config>"
    index_of: dict[str, int] = field(default_factory=dict)
    # Whether every decision must count prompt tokens exactly: token-per-minute limits spend
    # them (a refusal cools a deployment down, so a loose bound would distort routing).
    # Budgets reserve by an upper bound instead (cost.control.prompt_upper_bound).
    exact_tokens: bool = False
    access: Access = field(init=False)
    regions: frozenset[str] = frozenset()  # residency regions with deployments
    stats: GenerationStats | None = None  # set while the rollback guard watches this generation
    # Requests running on this generation: a reload closes its connection pools only
    # once they have finished (or after the longest total timeout, as a bound).
    in_flight: int = 0
    # Deployment index -> time.monotonic() of its last successful answer: a server error
    # shared by two deployments that serve others is the request's fault (dispatch.policy).
    served_at: dict[int, float] = field(default_factory=dict)
    capacity: Capacity = field(init=False)
    classes: list[str] = field(init=False)  # priority class names, highest first
    default_class: str = field(init=False)  # the class of a request that names none
    # time.time() when a reload swapped it in (0: the first generation). A request's record
    # starts after its generation's `since` and before the next one's: budgets a reload adds
    # count the requests before it from the ledger, those after it in memory (cost.control).
    since: float = 0.0
    # Per model, the drained deployments whose cached answers its requests may still get
    # (governance.drain.withdrawn): out of the core's lists, so absent from its decisions.
    drained: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The governance store's random salt for experiment arms (`sticky.py`), set at start and
    # carried from generation to generation: a reload never reshuffles arms.
    experiment_salt: bytes | None = None
    # (order, route, rule, region) -> the deployments whose cached answers such a request may
    # get (`openai_api.servable`): per generation, since a reload changes what each one is.
    servable_memo: dict[tuple[tuple[int, ...], str, str | None, str | None], Mapping[str, str]] = field(
        default_factory=dict
    )
    _idle: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.index_of = {d.name: d.index for d in self.deployments}
        deps = [self.config.deployments[d.name] for d in self.deployments]
        self.capacity = Capacity(
            self.router,
            [d.max_concurrency for d in deps],
            [d.max_queue for d in deps],
            [(d.queue_timeout_ms or 0) / 1000 for d in deps],
            [d.name for d in self.deployments],
            [d.reserve_percent for d in deps],
        )
        self.classes = self.config.priority.classes
        self.default_class = self.config.priority.default_class
        self.access = Access(self.config)
        self.regions = residency.regions(self.config)
        limits = self.config.rate_limits
        tpm = any(lim.tpm for lim in (limits.per_key, *limits.models.values(), *limits.deployments.values()) if lim)
        tpm = tpm or any(k.limits is not None and k.limits.tpm for k in self.config.keys.values())
        self.exact_tokens = bool(tpm)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no request runs on this generation (any number of waiters)."""
        if self.in_flight > 0:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    @classmethod
    def build(cls, config: Config, source: str = "<config>", previous: Live | None = None) -> Live:
        redact.register_config(config)  # the secrets it holds as plain URLs (env:/file: ones register as resolved)
        # What the core runs: drained deployments out of the models, residency folded into the rules.
        drained = drain.withdrawn(config)
        config = residency.effective(drain.serving(config))
        router = build_router(config, source, previous=previous.router if previous is not None else None)
        live = cls(config, router, make_upstreams(config), deployment_table(config, router.deployment_names()), source)
        live.drained = drained
        if previous is not None:
            live.capacity.shared = previous.capacity.shared  # the leases this process holds, by name
            live.experiment_salt = previous.experiment_salt
        live.apply_price_windows()
        return live

    def apply_price_windows(self, at: float | None = None) -> None:
        """Sets the core's price multipliers for the time-of-day windows in force at `at` (now)."""
        from edgeroute.cost.prices import apply_windows

        apply_windows(self.router, [(d.index, d.price) for d in self.deployments], at)


@dataclass(slots=True)
class Counters:
    """Load-shedding counters (per-request metrics live in `metrics.py`)."""

    requests: int = 0
    in_flight: int = 0
    shed: int = 0
    body_bytes: int = 0  # request bodies the requests in flight hold (declared, or the worst case)
    body_bytes_by: dict[str, int] = field(default_factory=dict)  # the same, by key id (`_admitted`)


class StreamTimer(Protocol):
    """A relayed stream's timer (`dispatch.deadline.Deadline`), as a drain moves it."""

    def when(self) -> float | None: ...

    def reschedule(self, when: float) -> None: ...


@dataclass(slots=True)
class ServerState:
    live: Live
    counters: Counters = field(default_factory=Counters)
    draining: bool = False
    background: set[asyncio.Task[None]] = field(default_factory=set)
    retiring: set[Live] = field(default_factory=set)  # replaced generations with requests still on them
    applying: asyncio.Lock = field(default_factory=asyncio.Lock)  # one config swapped in at a time (reload.py)
    # Held from reading the config file to applying it (a reload), and from applying a text to
    # writing it over the file (a rollback, an API change): the file and the running config
    # change together, so a restart or the next SIGHUP does not switch config silently.
    source_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Streams being relayed (their timers), and the loop time at which a drain cuts them.
    streams: set[StreamTimer] = field(default_factory=set)
    drain_at: float = math.inf
    # Handlers waiting in admission or on their upstream (nothing written to the client yet), and
    # those of them the drain cut (`cut_at_drain_end`).
    waiting: set[asyncio.Task[object]] = field(default_factory=set)
    cut: set[asyncio.Task[object]] = field(default_factory=set)

    def begin_drain(self, timeout: float) -> None:
        """Stops taking requests; streams still running at `timeout` from now are ended
        with an error event, and requests still waiting on their upstream then get an error
        (both before the HTTP server closes their connections)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        self.drain_at = loop.time() + timeout
        for t in self.streams:
            when = t.when()
            if when is None or when > self.drain_at:
                t.reschedule(self.drain_at)
        loop.call_at(self.drain_at, self._cut_waiting)

    @contextlib.contextmanager
    def cut_at_drain_end(self, rec: RequestRecord) -> Iterator[None]:
        """Around a handler's wait before it writes anything (admission, a dispatch): cut there
        by the drain's end, it raises a 503 `server_shutdown` (its API's format, `Retry-After`),
        recorded `drain_cut`, rather than a bare disconnect when the connection closes, recorded
        as the client's doing. Within another such wait, the outer one answers for the task."""
        task = asyncio.current_task()
        if task is None or task in self.waiting:
            yield
            return
        self.waiting.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self.cut:
                raise
            task.uncancel()
            rec.outcome = "drain_cut"
            raise ProxyError(
                503,
                "The server is shutting down and the answer did not come in time; retry the request.",
                code="server_shutdown",
                headers={"Retry-After": "1"},
            ) from None
        finally:
            self.waiting.discard(task)
            self.cut.discard(task)

    def _cut_waiting(self) -> None:
        """Cancels the dispatches still waiting at the drain's end, marked as its cuts: closed
        with the connection instead, they were a bare disconnect, recorded `client_gone`."""
        for task in self.waiting:
            self.cut.add(task)
            task.cancel()


STATE = web.AppKey("state", ServerState)
RECORDER = web.AppKey("recorder", Recorder)
