"""The response cache as the request path sees it: plan, look up, serve, store.

The endpoint asks for a :class:`Plan` once the core has decided (the route and the
deployments this request may reach are known) and admission has let it in (so a hit still
counts against RPM; it reserves no budget because it costs nothing). A hit is served only
if the deployment that produced it is one this request could have been sent to: rules on
PII, residency and tags hold for cached answers too. A drained deployment counts as one the
request could have been sent to when its rule allows it: draining stops new requests, it
does not make past answers wrong. Entries are scoped to one key by default (`scope: team |
global` widens that on purpose), and only deterministic requests are cached unless
`deterministic_only: false`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgeroute import redis_client
from edgeroute.cache import remote
from edgeroute.cache.entry import Entry, completion_from_stream, kind_of, storable
from edgeroute.cache.key import KeyMemo, cache_key, is_deterministic
from edgeroute.cache.semantic import (
    Guards,
    SemanticIndex,
    builtin_embedder,
    context_hash,
    guards,
    split_last_user_turn,
)
from edgeroute.cache.settings import CacheStore, RouteCache
from edgeroute.cache.shared_index import SharedIndexes, encode
from edgeroute.cache.signing import signer
from edgeroute.cache.stores import CacheCounters, MemoryStore, RedisStore, Store
from edgeroute.config import Config
from edgeroute.cost.keys import IDENTITY, Identity
from edgeroute.errors import ProxyError
from edgeroute.outcome import Outcome
from edgeroute.upstream import Upstream

log = logging.getLogger("edgeroute.cache")

HEADER = "x-edgeroute-cache"
# On a stale answer: the code of the error it stands in for (`upstream_failed`, `upstream_timeout`,
# `upstream_rate_limited`, `no_deployment_available`, ...), so that a client can tell.
STALE_REASON = "x-edgeroute-stale-reason"
_DIRECTIVES = ("bypass", "refresh", "only-if-cached")
Label = Literal["hit", "miss", "stale", "bypass"]
_T = TypeVar("_T")


# How attempts fail when the deployments cannot answer now (down, slow, overloaded), or cannot
# read this request (skipped, never sent): what a stale answer may stand in for. Not a verdict on
# the request (4xx, context window, content policy) nor the refusal of edgeroute's credentials
# (`auth_error`): a stale 200 would hide from the client that the request will never succeed,
# and from the operator's clients that a key broke, for the whole stale-if-error window.
_UNAVAILABLE = frozenset({"server_error", "timeout", "connect_error", "rate_limited", "cannot_read"})
# How long a managed key that ended is remembered here (`forget`): a request of it still in flight
# then stores nothing when it ends. With managed keys, `key_ended` (the key view's) answers for as
# long as the key stays ended, whatever a request's `timeouts.total`: a stream may outlive this.
ENDED_KEEP_S = 600.0


def stale_reason(error: ProxyError) -> str | None:
    """Why a failed call may be answered with a stale entry (the error's code), or None when
    it may not: only a failure of availability (a 5xx or 429 whose attempts all failed so, or
    no deployment to call), never the request's own fault or a refusal of our credentials."""
    if error.status != 429 and error.status < 500:
        return None
    if any(d.get("error") not in _UNAVAILABLE for d in error.details or ()):
        return None
    return error.code or error.type


class _Attempt(Protocol):
    @property
    def outcome(self) -> str: ...
    @property
    def cost_usd(self) -> float: ...


def answer_cost(attempts: Iterable[_Attempt]) -> float:
    """What producing an answer cost, kept in its entry as what each hit saves: its successful
    attempts' (one; an embeddings request split in pieces has several), not those that failed
    before it or lost a hedge beside it (priced at their prompt), which the miss paid and a
    hit does not replace."""
    return sum(a.cost_usd for a in attempts if a.outcome == Outcome.SUCCESS)


# The longest last user turn (characters) looked up and indexed by meaning. Embedding runs on
# one thread: a turn of megabytes would hold every other semantic lookup up for a second.
# Longer turns are matched exactly only (a paraphrase of a 10,000-word turn is rare anyway).
MAX_SEMANTIC_TURN = 32 * 1024
# What one tenant may have waiting for or on the embedding thread at once, in UTF-8 bytes of
# last user turns (a CJK character costs about three Latin ones to embed); past it, its further
# turns are matched exactly only. A tenant with none waiting always gets one turn in. The thread
# embeds for every tenant: one key's flood of long turns sent `only-if-cached` (free: a 504,
# no upstream call) held every tenant's semantic lookups for seconds.
EMBED_SHARE_BYTES = 64 * 1024
# A turn that has not started embedding within this is matched exactly only (the thread skips
# it when it comes to it), so that many tenants' floods at once cannot hold a lookup longer.
EMBED_START_WITHIN_S = 0.5
_LATE = object()  # what a job that started too late gives back


class EmbeddingQueue:
    """The one embedding thread, shared fairly by tenants (`EMBED_SHARE_BYTES`, `EMBED_START_WITHIN_S`)."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="edgeroute-embed")
        self.held: dict[str, int] = {}  # tenant -> bytes of its turns waiting or being embedded

    def submit(self, tenant: str, fn: Callable[[str], _T], turn: str) -> asyncio.Future[_T | object] | None:
        """`fn(turn)` on the thread (`_LATE` if it could not start in time), or None when the
        tenant's share is full. Without keys every request is one tenant's: only the deadline holds."""
        cost = len(turn.encode("utf-8", "surrogatepass"))
        held = self.held.get(tenant, 0)
        if tenant and held and held + cost > EMBED_SHARE_BYTES:
            return None
        self.held[tenant] = held + cost
        deadline = time.monotonic() + EMBED_START_WITHIN_S

        def job() -> _T | object:
            return _LATE if time.monotonic() > deadline else fn(turn)

        fut = asyncio.get_running_loop().run_in_executor(self.executor, job)
        fut.add_done_callback(lambda _: self._release(tenant, cost))
        return fut

    def _release(self, tenant: str, cost: int) -> None:
        left = self.held.get(tenant, 0) - cost
        if left > 0:
            self.held[tenant] = left
        else:
            self.held.pop(tenant, None)


@dataclass(slots=True, frozen=True)
class Directive:
    """What the client asked of the cache (`x-edgeroute-cache`, `Cache-Control`, `Pragma`).

    `max_age`, `min_fresh`, `max_stale`: the request's `Cache-Control` bounds (RFC 9111
    5.2.1), in seconds, None when not sent. The first two judge a fresh hit (`fresh`);
    `max_age` and `max_stale` judge a stale-if-error answer (`stale_ok`), which is still given
    only when every deployment fails (a client's `max-stale` never makes a stale hit)."""

    lookup: bool = True
    store: bool = True
    only_if_cached: bool = False
    max_age: float | None = None
    min_fresh: float | None = None
    max_stale: float | None = None

    def fresh(self, age: float, ttl: float) -> bool:
        """Whether an entry this old may be served as a hit (its route's `ttl`)."""
        if age > ttl:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        return self.min_fresh is None or ttl - age >= self.min_fresh

    def stale_ok(self, age: float, ttl: float) -> bool:
        """Whether an entry this old may stand in for a failed call (within `stale_if_error`)."""
        if self.max_age is not None and age > self.max_age:
            return False
        return self.max_stale is None or age - ttl <= self.max_stale

    @classmethod
    def of(cls, request: web.Request) -> Directive:
        got = request.headers
        raw, control = got.get(HEADER), got.get("Cache-Control")
        if raw is None and control is None:
            # Most requests: one object shared, nothing parsed. `Pragma: no-cache` counts only
            # without `Cache-Control` (RFC 9111 5.4): an HTTP/1.0 client's "revalidate".
            return _REVALIDATE if "Pragma" in got and _pragma_no_cache(got) else _DEFAULT
        lookup = store = True
        only_if_cached = False
        if raw is not None:
            values = {v.strip().lower() for v in got.getall(HEADER)}
            if len(values) > 1:  # two lines that disagree: which one the client meant is a guess
                raise ProxyError(
                    400,
                    f"Header {HEADER} was sent more than once with different values; send it once.",
                    code="invalid_header",
                    param=HEADER,
                )
            value = values.pop()
            if value not in _DIRECTIVES:
                shown = raw[:40].encode("ascii", "replace").decode("ascii")
                raise ProxyError(
                    400,
                    f"Invalid value {shown!r} for header {HEADER}; expected one of {', '.join(_DIRECTIVES)}.",
                    code="invalid_header",
                    param=HEADER,
                )
            if value == "bypass":
                lookup = store = False
            elif value == "refresh":
                lookup = False
            else:
                only_if_cached = True
        if control is None:
            if _pragma_no_cache(got):
                lookup = False
            return cls(lookup, store, only_if_cached)
        bounds: dict[str, float] = {}
        # Repeated Cache-Control lines are one list (RFC 9110 5.3): each line counts.
        for line in got.getall("Cache-Control", ()):
            for part in line.lower().split(","):
                name, _, arg = part.replace(" ", "").replace("\t", "").partition("=")
                if name == "no-store":
                    store = False
                elif name == "no-cache":  # serve nothing stored without going upstream
                    lookup = False
                elif name == "only-if-cached":
                    only_if_cached = True
                elif name in _BOUNDS:
                    if name == "max-stale" and not arg:
                        seconds: float | None = _DELTA_MAX  # any staleness (the route's window still bounds it)
                    else:
                        seconds = _delta_seconds(arg)
                    if seconds is not None:  # an invalid value is ignored (RFC 9111 4.2.1, 5.2)
                        # A directive sent twice: the stricter of the two.
                        tighter = max if name == "min-fresh" else min
                        bounds[name] = tighter(bounds.get(name, seconds), seconds)
        if bounds.get("max-age") == 0:
            lookup = False  # nothing stored is young enough: a refresh (labelled `bypass`)
        return cls(
            lookup, store, only_if_cached, bounds.get("max-age"), bounds.get("min-fresh"), bounds.get("max-stale")
        )


# The request directives that bound an entry's age, and the largest delta-seconds value kept:
# a larger one (or one of more digits than int() takes) is this (RFC 9111 1.2.2).
_BOUNDS = frozenset({"max-age", "min-fresh", "max-stale"})
_DELTA_MAX = float(2**31)


def _delta_seconds(arg: str) -> float | None:
    """A directive's delta-seconds (digits, optionally quoted), or None when it is not one."""
    if len(arg) >= 2 and arg[0] == arg[-1] == '"':
        arg = arg[1:-1]
    if not arg or not arg.isascii() or not arg.isdigit():
        return None
    return _DELTA_MAX if len(arg) > 10 else min(float(int(arg)), _DELTA_MAX)


def _pragma_no_cache(got: Any) -> bool:
    return any(p.strip().lower() == "no-cache" for v in got.getall("Pragma", ()) for p in v.split(","))


_DEFAULT = Directive()
_REVALIDATE = Directive(lookup=False)


@dataclass(slots=True)
class Plan:
    """One request's dealings with the cache."""

    route: str
    key: str
    settings: RouteCache
    directive: Directive
    cacheable: bool  # deterministic (or the route caches sampled answers too)
    label: Label = "miss"
    stale: Entry | None = None  # past its ttl but within stale-if-error: served only if every deployment fails
    # Semantic mode: the last user turn and the hash of everything else; its embedding and
    # guards once looked up (kept to index the answer); the similarity of a semantic hit.
    turn: str | None = None
    context: str | None = None
    vector: Any = None
    guards: Guards | None = None
    similarity: float | None = None
    fetching: asyncio.Future[Any] | None = None  # the exact entry, asked for early (`prefetch`)
    # The embedding space of `vector`: the configured embedder's name and model (None: the
    # built-in one). Indexes are kept per space: a reload may point the name at another model.
    space: str | None = None
    # The managed key whose request this is: what it stores is dropped when it is revoked.
    owner: str | None = None
    # Whose share of the route's bounds what it stores counts against (`share_of`): the store's
    # and the semantic index's bounds are shared fairly among tenants.
    tenant: str = ""
    writer: str = ""  # the request's id: kept in what it stores, so that a hit's record names it
    # The deployments the request may be sent to (`lookup`'s `allowed`): whether the route's own
    # are among them tells a fallback's answer in a blip from the only answer it can get.
    allowed: Mapping[str, str] | None = None
    # Whose entries it may be served (`tenant_of`) and what its endpoint answers ("chat",
    # "embeddings"): kept in what it stores, checked on what it reads (`_belongs`).
    scope: str = ""
    kind: str = "chat"

    @property
    def stores(self) -> bool:
        return self.cacheable and self.directive.store


def rule_admits(cfg: Config, deployment: str, rule: str | None, region: str | None) -> bool:
    """Whether the rule that routed a request (its `deployments`, required and excluded tags)
    and its key's region allow `deployment`, which the core did not consider: an embedding
    deployment, or a drained one whose cached answers the request might get."""
    dep = cfg.deployments.get(deployment)
    if dep is None:
        return False
    tags = {*dep.tags, f"provider:{dep.provider}"}
    then = next((r.then for r in cfg.rules if r.name == rule), None) if rule is not None else None
    if then is not None:
        if then.deployments and deployment not in then.deployments:
            return False
        if not set(then.require_tags) <= tags or tags & set(then.exclude_tags):
            return False
    if region is not None:
        res = cfg.governance.residency
        return (res.tag_prefix if res is not None else "region:") + region in tags
    return True


def embedder_admits(cfg: Config, embedder: str, rule: str | None, region: str | None) -> bool:
    """Whether a request's text may go to embedding deployment `embedder`: the rule that routed
    it and its key's region hold for the embedder as for the deployments that answer.
    Otherwise a prompt a PII rule keeps to a private deployment went to a public embeddings
    API before it was answered."""
    return rule_admits(cfg, embedder, rule, region)


class ResponseCache:
    """The cache of one server: one store; each request brings its route's settings from the running config."""

    def __init__(self, store: Store, counters: CacheCounters, shared: SharedIndexes | None = None) -> None:
        self.store = store
        self.counters = counters
        self.shared = shared  # the semantic index's records, shared through Redis with the entries
        self.keys = KeyMemo()  # exact keys of the bodies seen lately: a hit does not parse its body again
        self._writes: set[asyncio.Task[None]] = set()
        # Managed keys seen to end lately, and when (`forget`): what their requests still in
        # flight then answer is not stored (`_put`).
        self._ended: dict[str, float] = {}
        self.key_ended: Callable[[str], bool] | None = None  # the managed keys' view (bound by governance)
        self._indexes: dict[tuple[str, str | None], SemanticIndex] = {}  # per route and embedding space
        self._embedding = EmbeddingQueue()
        # The running config and its upstream pools, for configured embedders (bound by the
        # server: a reload replaces both).
        self._live: Callable[[], tuple[Config, Mapping[str, Upstream]]] | None = None

    def bind_embedders(self, live: Callable[[], tuple[Config, Mapping[str, Upstream]]]) -> None:
        self._live = live

    def _embedders(self, name: str) -> tuple[Upstream, str] | None:
        """A deployment's provider pool and model, from the running config."""
        if self._live is None:
            return None
        config, upstreams = self._live()
        dep = config.deployments.get(name)
        up = upstreams.get(dep.provider) if dep is not None else None
        return None if dep is None or up is None else (up, dep.model)

    @classmethod
    def build(
        cls, backend: CacheStore, redis: tuple[str, str, int] | None, experiment_salt: str | None = None
    ) -> ResponseCache:
        """`redis` is (url, key prefix, timeout ms) when shared state is configured; entries
        there are signed with `backend.signing_key`, else `experiment_salt`, if either is set."""
        counters = CacheCounters()
        if backend.backend == "redis" or (backend.backend == "auto" and redis is not None):
            if redis is None:
                raise ValueError("cache.backend: redis needs shared_state.redis_url")
            sign = signer(backend.signing_key, experiment_salt)
            store = RedisStore(counters, *redis, signer=sign)
            return cls(store, counters, SharedIndexes(*redis, counters, sign))
        return cls(MemoryStore(counters), counters)

    def plan(
        self,
        request: web.Request,
        settings: RouteCache | None,
        route: str,
        body: bytes,
        tenant: str,
        writer: str = "",
    ) -> Plan | None:
        """None when the route does not cache. Raises 400 for a bad cache header, and 504 for
        `only-if-cached` where nothing can be cached. `writer`: the request's id, kept in the
        entry it stores, so that a hit's record names the request whose answer it served."""
        directive = Directive.of(request)
        if settings is None or settings.mode == "off":
            if directive.only_if_cached:
                raise _not_cached()
            return None
        if settings.mode != "semantic":
            if (keyed := self.keys.key(body, route, tenant)) is None:
                return None  # not a JSON object: the core parsed it already, unreachable in practice
            key, deterministic = keyed
            cacheable = not settings.deterministic_only or deterministic
            plan = _new_plan(request, (route, key, tenant, writer), settings, directive, cacheable)
            return self._bypass_unless_looked_up(plan)
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None  # the core parsed it already; unreachable in practice
        cacheable = not settings.deterministic_only or is_deterministic(obj)
        plan = _new_plan(
            request, (route, cache_key(obj, route, tenant), tenant, writer), settings, directive, cacheable
        )
        if (split := split_last_user_turn(obj)) is not None and len(split[0]) <= MAX_SEMANTIC_TURN:
            plan.turn, plan.context = split[0], context_hash(split[1], route, tenant)
        return self._bypass_unless_looked_up(plan)

    def confine(self, plan: Plan | None, cfg: Config, rule: str | None, region: str | None) -> None:
        """No semantic lookup or indexing for a request whose last user turn may not go to the
        route's embedding deployment (see `embedder_admits`): the exact cache still serves it."""
        if plan is None or plan.turn is None or plan.settings.embedder is None:
            return
        if not embedder_admits(cfg, plan.settings.embedder, rule, region):
            plan.turn = plan.context = None

    def plan_exact(
        self,
        request: web.Request,
        settings: RouteCache | None,
        route: str,
        fields: dict[str, Any],
        tenant: str,
        writer: str = "",
    ) -> Plan | None:
        """As `plan`, for an endpoint whose answer `fields` determine exactly (embeddings: always
        deterministic, matched exactly even on a semantic route). The endpoint names itself in
        `fields`, so its entries never meet chat's."""
        directive = Directive.of(request)
        if settings is None or settings.mode == "off":
            if directive.only_if_cached:
                raise _not_cached()
            return None
        plan = _new_plan(request, (route, cache_key(fields, route, tenant), tenant, writer), settings, directive, True)
        plan.kind = "embeddings"
        return self._bypass_unless_looked_up(plan)

    @staticmethod
    def never_cached(request: web.Request) -> None:
        """For an endpoint whose answers are never cached: its cache header still means what it
        means elsewhere (400 for a bad value; 504 for `only-if-cached`, which a client sends so
        that nothing is spent upstream)."""
        got = request.headers
        if (HEADER in got or "Cache-Control" in got) and Directive.of(request).only_if_cached:
            raise _not_cached()

    def _bypass_unless_looked_up(self, plan: Plan) -> Plan:
        if not plan.cacheable or not plan.directive.lookup:
            plan.label = "bypass"
            self.counters.bypass += 1
            if plan.directive.only_if_cached:
                raise _not_cached()
        return plan

    def prefetch(self, plan: Plan | None) -> None:
        """Asks a remote store for the plan's exact entry now, so that the round trip overlaps
        admission's; `lookup` uses the answer. Call `discard` if the request goes no further."""
        if plan is not None and plan.label != "bypass" and isinstance(self.store, RedisStore):
            plan.fetching = self.store.fetch(plan.route, plan.key, plan.settings.max_entry_bytes)

    @staticmethod
    def discard(plan: Plan | None) -> None:
        """Drops a prefetch that will not be used (the request was refused or rerouted)."""
        if plan is not None and plan.fetching is not None:
            if plan.fetching.done() and not plan.fetching.cancelled():
                plan.fetching.exception()  # retrieved: a failed lookup nobody reads is not an error
            plan.fetching.cancel()
            plan.fetching = None

    async def lookup(self, plan: Plan, allowed: Mapping[str, str], final: bool = True) -> Entry | None:
        """A fresh entry this request may be served; remembers a stale one for stale-if-error.
        `allowed`: the deployments this request may be sent to, by name: what each is now
        (`DeploymentInfo.cached_as`). `final=False`: a first look before the request is
        rerouted, whose new plan is looked up next (a miss here is neither counted nor an
        `only-if-cached` 504)."""
        plan.allowed = allowed
        if plan.label == "bypass":
            return None
        fetching, plan.fetching = plan.fetching, None
        shared = self.store if isinstance(self.store, RedisStore) else None
        if fetching is not None and shared is not None:
            entry = await shared.get(plan.route, plan.key, plan.settings.max_entry_bytes, fetching)
        else:
            entry = await self.store.get(plan.route, plan.key, plan.settings.max_entry_bytes)
        if entry is not None and not self._belongs(plan, plan.key, entry):
            entry = None
        if entry is not None and entry.servable(allowed):  # else produced where this request may not go
            age, ttl, wants = entry.age(), plan.settings.ttl, plan.directive
            if not entry.fallback and wants.fresh(age, ttl):
                plan.label = "hit"
                self.counters.hits += 1
                if shared is not None:  # (in memory, `get` moved it already)
                    shared.touch(plan.route, plan.key, plan.tenant)
                return entry
            if age <= ttl + plan.settings.stale_if_error and wants.stale_ok(age, ttl):
                plan.stale = entry
        if plan.turn is not None and (similar := await self._semantic_lookup(plan, allowed)) is not None:
            return similar
        if not final:
            return None
        self.counters.misses += 1
        if plan.directive.only_if_cached:
            raise _not_cached()
        return None

    def _belongs(self, plan: Plan, key: str, entry: Entry) -> bool:
        """Whether `entry`, read under `key`, was stored there for a request of this plan's
        tenant and endpoint: one copied under another key in the shared store, or a shared
        semantic record pointing another tenant's lookups at it, is a miss (counted)."""
        if entry.key == key and entry.tenant == plan.scope and entry.kind == plan.kind:
            return True
        self.counters.invalid += 1
        log.warning("response cache: an entry stored for another request was ignored (route %s)", plan.route)
        return False

    def unusable(self, plan: Plan) -> None:
        """The hit `lookup` found cannot be given to this client: a miss after all (asked
        upstream, its answer stored over the entry), never served as stale either."""
        if plan.label == "hit":
            plan.label = "miss"
            self.counters.hits -= 1
            self.counters.misses += 1
        plan.stale = None

    async def _analyze(self, plan: Plan) -> bool:
        """Embeds the last user turn and computes its guards (off the loop); False when the
        configured embedder failed (counted; the request goes on as a miss), or when the
        embedding thread could not take the turn in time or the tenant's share of it is full
        (counted: matched exactly only)."""
        assert plan.turn is not None
        name = plan.settings.embedder
        if name is None:
            analyzed = await self._on_thread(plan, builtin_embedder().analyze)
            if analyzed is None:
                return False
            plan.vector, plan.guards = analyzed
            return True
        target = self._embedders(name)
        if target is not None:
            plan.space = f"{name}@{target[1]}"
        try:
            if target is None:
                raise remote.EmbeddingError(f"deployment {name} is not in the running config")
            guarding, got = self._embedding.submit(plan.tenant, guards, plan.turn), _LATE
            if guarding is not None:  # (else the tenant's share is full: nothing is sent either)
                try:
                    plan.vector = await remote.embed(*target, plan.turn, plan.settings.embed_timeout_ms / 1000)
                finally:
                    got = await guarding
            if got is _LATE:
                self.counters.embedding_skipped += 1
                plan.vector = None
                return False
            plan.guards = cast(Guards, got)
        except remote.EmbeddingError as e:
            self.counters.embedding_errors += 1
            plan.vector = None
            log.warning("cache: the embedder %s failed (%s); served as a miss", name, e)
            return False
        return True

    async def _on_thread(self, plan: Plan, fn: Callable[[str], _T]) -> _T | None:
        """`fn(plan.turn)` on the embedding thread; None (counted) when it could not be done in time."""
        assert plan.turn is not None
        fut = self._embedding.submit(plan.tenant, fn, plan.turn)
        got = _LATE if fut is None else await fut
        if got is _LATE:
            self.counters.embedding_skipped += 1
            return None
        return got  # type: ignore[return-value]

    def _index(self, plan: Plan, create: bool) -> SemanticIndex | None:
        """The route's index for its embedder; a new one when the vectors' size changed (another model)."""
        return self._index_of(plan.route, plan.space, len(plan.vector), plan.settings.max_entries, create)

    def _index_of(
        self, route: str, embedder: str | None, ndim: int, max_entries: int, create: bool
    ) -> SemanticIndex | None:
        key = (route, embedder)
        index = self._indexes.get(key)
        if (index is None or index.ndim != ndim) and create:
            index = self._indexes[key] = SemanticIndex(max_entries, ndim)
        return index if index is not None and index.ndim == ndim else None

    async def _follow(self, plan: Plan) -> None:
        """With a shared index: this route's records from the other instances (its stream followed
        from the first lookup on; that lookup waits, within the Redis timeout, for the backlog)."""
        if self.shared is None:
            return
        route, embedder, max_entries = plan.route, plan.space, plan.settings.max_entries

        def add(records: list[tuple[Any, str, Guards, str, str]]) -> None:
            for vector, context, g, key, tenant in records:
                index = self._index_of(route, embedder, len(vector), max_entries, create=True)
                if index is not None:
                    index.add(vector, context, g, key, tenant)

        loop = asyncio.get_running_loop()
        run = self._embedding.executor
        await self.shared.follow(route, embedder, add, lambda fn, arg: loop.run_in_executor(run, fn, arg))

    async def _semantic_lookup(self, plan: Plan, allowed: Mapping[str, str]) -> Entry | None:
        """The freshest allowed answer of a request whose last user turn means the same."""
        assert plan.turn is not None and plan.context is not None
        if not await self._analyze(plan):
            return None
        assert plan.guards is not None
        await self._follow(plan)
        index = self._index(plan, create=False)
        if index is None:
            return None
        for cand in index.search(plan.vector, plan.context, plan.guards, plan.settings.similarity):
            entry = await self.store.get(plan.route, cand.key, plan.settings.max_entry_bytes)
            if (
                entry is not None
                and self._belongs(plan, cand.key, entry)
                and entry.servable(allowed)
                and plan.directive.fresh(entry.age(), plan.settings.ttl)
                and not entry.fallback
            ):
                plan.label, plan.similarity = "hit", cand.similarity
                self.counters.hits += 1
                self.counters.semantic_hits += 1
                if isinstance(self.store, RedisStore):  # the share of the tenant that stored it
                    self.store.touch(plan.route, cand.key, cand.tenant)
                return entry
        return None

    def serve_stale(self, plan: Plan, error: ProxyError) -> Entry | None:
        """The stale entry to answer with now that every deployment failed with `error`, if
        there is one and the failure is one of availability (`stale_reason`), and it is still
        within its window (and the client's `max-stale`, `max-age`) now: it was chosen at the
        lookup, and the calls that failed since may have taken minutes."""
        if plan.stale is None or stale_reason(error) is None:
            return None
        age, ttl = plan.stale.age(), plan.settings.ttl
        if age > ttl + plan.settings.stale_if_error or not plan.directive.stale_ok(age, ttl):
            return None
        plan.label = "stale"
        self.counters.stale += 1
        return plan.stale

    def save_json(self, plan: Plan, body: bytes, deployment: tuple[str, str], cost_usd: float) -> None:
        """`deployment`: the answering deployment's `DeploymentInfo.cached_as`."""
        if not plan.stores:
            return
        if len(body) > plan.settings.max_entry_bytes:  # by its size, not parsed on the loop to be dropped
            self.counters.too_large += 1
            return
        if kind_of(body) == plan.kind:  # (what `Entry.loads` reads back)
            self._save(plan, self._entry(plan, body, deployment, cost_usd))

    def save_stream(self, plan: Plan, stream: bytes, deployment: tuple[str, str], cost_usd: float) -> None:
        """A stream that ended cleanly, as OpenAI-format SSE bytes; a partial one is never stored."""
        if not plan.stores:
            return
        if len(stream) > 4 * plan.settings.max_entry_bytes:  # its answer is too, or near it: not folded
            self.counters.too_large += 1
            return
        completion = completion_from_stream(stream)
        if completion is not None and storable(completion) and plan.kind == "chat":
            self._save(plan, self._entry(plan, orjson.dumps(completion), deployment, cost_usd))

    def _entry(self, plan: Plan, body: bytes, deployment: tuple[str, str], cost_usd: float) -> Entry:
        name, upstream = deployment
        fallback = self._fallback(plan, name)
        return Entry(
            body, name, time.time(), cost_usd, upstream, plan.writer, fallback, plan.key, plan.scope, plan.kind
        )

    def _fallback(self, plan: Plan, deployment: str) -> bool:
        """Whether `deployment` answered in a blip of the route's own deployments (it is not one
        of them in the running config, and one of them could have taken the request): its answer
        would otherwise be served as the route's, fresh, for the whole ttl after they are back.
        When none of them could (the prompt fits none, a rule bars them), the fallback's answer
        is the only one the request can get: kept as any other."""
        if self._live is None:
            return False
        model = self._live()[0].models.get(plan.route)
        if model is None or deployment in model.deployments:
            return False
        return plan.allowed is None or any(d in plan.allowed for d in model.deployments)

    def _save(self, plan: Plan, entry: Entry) -> None:
        if entry.fallback and plan.settings.stale_if_error <= 0:
            return  # kept only to be served stale, which the route never does
        if len(entry.body) > plan.settings.max_entry_bytes:
            self.counters.too_large += 1
            return
        self.counters.stores += 1
        task = asyncio.get_running_loop().create_task(self._put(plan, entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, plan: Plan, entry: Entry) -> None:
        # The exact entry first: a slow or failing embedder must not delay exact hits.
        keep = plan.settings.ttl + plan.settings.stale_if_error
        bounds = (plan.settings.max_entries, plan.settings.max_bytes)
        if plan.owner is not None and self._has_ended(plan.owner):
            return  # its key ended while it was answered: `forget` dropped what it stored before
        if not await self.store.put(plan.route, plan.key, entry, keep, bounds, plan.owner, plan.tenant):
            return
        if plan.turn is not None and plan.context is not None and not entry.fallback:
            # Not looked up (refresh, bypass), or the embedder failed then: embed it now.
            if plan.vector is not None or await self._analyze(plan):
                index = self._index(plan, create=True)
                assert index is not None and plan.guards is not None
                index.add(plan.vector, plan.context, plan.guards, plan.key, plan.tenant)
                if self.shared is not None:
                    record = encode(self.shared.origin, plan.key, plan.context, plan.guards, plan.vector, plan.tenant)
                    await self.shared.publish(
                        plan.route, plan.space, record, keep, plan.settings.max_entries, plan.owner, plan.tenant
                    )

    async def forget(self, owners: Collection[str]) -> int:
        """Drops what requests of these managed keys (revoked) stored, in every scope: their
        entries (in this process, or in Redis with the shared semantic records), and the
        semantic records in this process's indexes that point at them. A revoked key may have
        been leaked: its prompts' answers (a key-scoped entry is its own data, reachable by no
        one now) and what it put in a team's or everyone's cache go at once, not at their ttl.
        Returns how many entries went; a store that cannot be reached is logged."""
        owners = sorted(owners)
        self._remember_ended(owners)
        try:
            dropped = await self.store.forget(owners)
            if self.shared is not None:
                await self.shared.forget(owners)
        except redis_client.errors() as e:
            log.error("response cache: the entries of revoked keys could not be dropped (%s)", type(e).__name__)
            return 0
        if dropped:
            for index in list(self._indexes.values()):
                index.remove_keys(dropped)
            log.info("response cache: dropped %d entries of revoked keys %s", len(dropped), ", ".join(owners))
        return len(dropped)

    def _has_ended(self, owner: str) -> bool:
        if self.key_ended is not None and self.key_ended(owner):
            return True
        since = self._ended.get(owner)
        return since is not None and time.monotonic() - since <= ENDED_KEEP_S

    def _remember_ended(self, owners: Collection[str]) -> None:
        now = time.monotonic()
        for owner, since in list(self._ended.items()):
            if now - since > ENDED_KEEP_S:
                del self._ended[owner]
        self._ended.update(dict.fromkeys(owners, now))

    async def warm_up(self, routes: Collection[RouteCache]) -> None:
        """Loads the embedder before serving when a route matches by meaning (about a second)."""
        if any(r.mode == "semantic" and r.embedder is None for r in routes):
            await asyncio.get_running_loop().run_in_executor(self._embedding.executor, builtin_embedder)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=2)
        await self.store.close()
        if self.shared is not None:
            await self.shared.close()
        self._embedding.executor.shutdown(wait=False)


def _new_plan(
    request: web.Request, names: tuple[str, str, str, str], settings: RouteCache, directive: Directive, cacheable: bool
) -> Plan:
    """A request's plan; `names`: its (route, key, tenant, writer). What it stores is dropped
    with its managed key, counts against its share (`share_of`) and names its writer."""
    route, key, tenant, writer = names
    owner, share = _owner(request), share_of(tenant, request)
    return Plan(route, key, settings, directive, cacheable, owner=owner, tenant=share, writer=writer, scope=tenant)


def _owner(request: web.Request) -> str | None:
    """The managed key a request came with (a key of the config is not revoked but removed)."""
    ident = request.get(IDENTITY)
    return ident.key if ident is not None and ident.managed else None


def _not_cached() -> ProxyError:
    return ProxyError(504, "No cached answer for this request (x-edgeroute-cache: only-if-cached).", code="cache_miss")


def tenant_of(scope: str, key: str | None, team: str | None) -> str:
    """Whose entries a request shares: its key's, its team's, or everyone's."""
    if scope == "global":
        return "*"
    if scope == "team" and team:
        return f"team:{team}"
    return f"key:{key or 'anonymous'}"


def share_of(tenant: str, request: web.Request) -> str:
    """Whose share of a route's bounds a request's entry counts against: its team's when the
    entries are the team's (`scope: team`, or the writer's team under `scope: global`), else
    its root key's (the managed key at the top of the chain that made it, `root_key`), so that
    one tenant filling the cache pushes out its own entries, not everyone else's, and a holder
    minting child keys gets one share, not one per key. Without keys, "": one tenant, whose
    share is the whole bound. Which entries a request may be served (`tenant`) is unchanged."""
    ident = request.get(IDENTITY)
    if ident is None:
        return ""
    if tenant.startswith("team:"):
        return tenant
    if tenant == "*" and ident.team:
        return tenant_of("team", ident.key, ident.team)
    return f"key:{root_key(ident)}"


def root_key(ident: Identity) -> str:
    """The key at the top of the chain of managed keys that made this one (`spends_for`: the
    key, then its makers), or the config key of a team that made that chain (`share_root`: a
    team's admin key minting keys must not get a share per key); the key itself for a key of
    the config. Keys an operator's global config key made are each their own root: it makes
    them for different tenants."""
    if ident.share_root is not None:
        return ident.share_root
    return ident.spends_for[-1] if ident.spends_for else ident.key


CACHE = web.AppKey("response_cache", ResponseCache)


def metrics_source(app: web.Application) -> Iterator[Metric]:
    """The cache's counters and size, for `/metrics` (read at scrape time)."""
    c = app[CACHE].counters
    events = CounterMetricFamily(
        "edgeroute_cache_lookups", "Response cache outcomes (semantic: hits matched by meaning).", labels=["result"]
    )
    for result, value in (
        ("hit", c.hits - c.semantic_hits),
        ("semantic_hit", c.semantic_hits),
        ("miss", c.misses),
        ("stale", c.stale),
        ("bypass", c.bypass),
    ):
        events.add_metric([result], value)
    yield events
    yield CounterMetricFamily("edgeroute_cache_stores", "Answers stored in the response cache.", value=c.stores)
    evictions = CounterMetricFamily(
        "edgeroute_cache_evictions",
        "Entries evicted: lru, the writing tenant's least recently used; tenant_share, another tenant's, which "
        "held the most; tenant_cap, the writing tenant's least recently used past max_entries (Redis); revoked, "
        "those of a managed key that ended.",
        labels=["reason"],
    )
    evictions.add_metric(["lru"], c.evictions - c.evicted_share - c.evicted_capped)
    evictions.add_metric(["tenant_share"], c.evicted_share)
    evictions.add_metric(["tenant_cap"], c.evicted_capped)
    evictions.add_metric(["revoked"], c.evicted_revoked)
    yield evictions
    yield CounterMetricFamily(
        "edgeroute_cache_not_stored_too_large", "Answers above max_entry_bytes, not stored.", value=c.too_large
    )
    errors = CounterMetricFamily(
        "edgeroute_cache_store_errors",
        "Store failures served as misses: unavailable, corrupt (did not decode), invalid (fields edgeroute does not "
        "write, or stored for another request's key, tenant or endpoint).",
        labels=["kind"],
    )
    errors.add_metric(["unavailable"], c.errors)
    errors.add_metric(["corrupt"], c.corrupt)
    errors.add_metric(["invalid"], c.invalid)
    yield errors
    yield CounterMetricFamily(
        "edgeroute_cache_semantic_skipped",
        "Semantic lookups and indexings matched exactly only: the embedding thread could not start them within "
        "0.5 s, or the tenant's share of it was full.",
        value=c.embedding_skipped,
    )
    yield CounterMetricFamily(
        "edgeroute_cache_embedding_errors",
        "Semantic lookups whose configured embedder failed (served as misses).",
        value=c.embedding_errors,
    )
    store = app[CACHE].store
    if isinstance(store, MemoryStore):
        entries, size = store.totals()
        yield GaugeMetricFamily("edgeroute_cache_entries", "Entries held in this process's cache.", value=entries)
        yield GaugeMetricFamily("edgeroute_cache_bytes", "Bytes held in this process's cache (bounded).", value=size)
