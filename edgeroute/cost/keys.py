"""Who may call: virtual keys (token -> key id, team, user, role) or shared keys.

Tokens are matched by their SHA-256 digest; the plain token is never stored past
config load, logged, echoed in an error or written to the ledger (the key id is).
When `keys:` is configured, an unknown or missing token is a 401 on every path but
the public ones, and each `/admin/*` route needs the role `roles.py` declares for it. With
`server.api_keys` instead, any of those keys is let in, compared in constant time.
With no keys at all (a sidecar), `sidecar_guard` refuses what a web page could send.
Tokens are compared as the bytes the client sent, whatever they are (never a 500).
An :class:`Access` belongs to one config generation, so a reload revokes and adds
keys (and re-reads `env:`/`file:` references, which is how a key is rotated).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from edgeroute import roles, secrets
from edgeroute.config import Budget, Config, Limit
from edgeroute.errors import ProxyError
from edgeroute.sidecar_guard import SidecarGuard

# Answered before any key check or load shedding (a scrape must get through an overload);
# `/metrics` checks its own key (`Access.check_metrics`).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(slots=True, frozen=True)
class Identity:
    key: str
    team: str | None = None
    user: str | None = None
    role: str | None = None
    limits: Limit | None = None
    residency: str | None = None  # the only region its requests may reach (governance/residency.py)
    # A managed key's own budget, then those of the keys that created it (governance/keys.py).
    budgets: tuple[Budget, ...] = ()
    # A managed key's id, then those of the keys that created it, budgeted or not: its requests'
    # cost is added to each one's monthly counter (`key_counter`) whether it has a budget or not.
    spends_for: tuple[str, ...] = ()
    # The rate limits of the managed keys that created it, by key id: its requests take from
    # their buckets too, so keys a rate-limited key creates share its limit.
    ancestor_limits: tuple[tuple[str, Limit], ...] = ()
    models: frozenset[str] | None = None  # the public models it may ask for (None: all)
    deny_tags: frozenset[str] = frozenset()  # request tags it may not send
    priority: str | None = None  # its requests' priority class (edgeroute.config.priority)
    priorities: frozenset[str] = frozenset()  # further classes it may ask for by header
    managed: bool = False  # a managed key (governance/keys.py), which can be revoked
    # The config key of a team that made its chain of managed keys, if one did: what it and its
    # makers count as for the shares of fairly shared resources (the response cache's bounds, the
    # embedding thread: `cache.service.root_key`), so that a team's admin key minting keys gets
    # one share, not one per key. (An operator's global key makes keys for other tenants: None.)
    share_root: str | None = None


class KeyEndWatch(Protocol):
    """A stream's look at its managed key (`KeySource.end_watch`)."""

    def __call__(self) -> tuple[str, str] | None:
        """(message, code) once the key is seen ended since the last call, else None."""
        ...

    def why(self) -> tuple[str, str] | None:
        """(message, code) if the key has ended."""
        ...

    def close(self) -> None:
        """The stream has ended: its `wake` is not called any more."""
        ...


class KeySource(Protocol):
    """Keys kept outside the config (governance/keys.py): None for a token it does not know;
    raises a 401 `ProxyError` for a known key that is revoked or expired."""

    def identify(self, token: str) -> Identity | None: ...

    def may_be_new(self, token: str) -> bool:
        """Whether a token `identify` refused may be a key made or rotated since its last read."""
        ...

    async def identify_after_read(self, token: str, since: float) -> Identity | None:
        """`identify` once a read started at or after `since` (monotonic) has come in (bounded)."""
        ...

    def budgets(self) -> list[Budget]:
        """Every key's own budget, for `/admin/budgets`."""
        ...

    def names(self) -> dict[str, str]:
        """The names keys were given (`keys create --name`), for `/admin/budgets`."""
        ...

    def ended(self) -> dict[str, str]:
        """The keys that no longer work (`revoked`, `expired`), for `/admin/budgets`."""
        ...

    def key_ids(self) -> list[str]:
        """Every key (revoked ones too), for the ledger's read-back of their counters."""
        ...

    def spenders(self, key_id: str) -> list[str]:
        """The keys whose spend counts against `key_id`'s budget (itself and those below it)."""
        ...

    def limits(self) -> dict[str, Limit]:
        """Each key's own RPM/TPM limits, for the ledger's read-back of their windows at start."""
        ...

    def key_teams(self) -> dict[str, str | None]:
        """Each key's team (revoked keys too), for the team views of `/admin/budgets`."""
        ...

    def teams(self) -> set[str]:
        """Every team a key belongs to (revoked keys too)."""
        ...

    def end_watch(self, key_id: str, wake: Callable[[], None] | None = None) -> KeyEndWatch:
        """For a stream of `key_id`: (message, code) once the key has ended (revoked, expired), in
        O(1); `wake` called on the loop when it is seen to end."""
        ...


def key_budget_name(key_id: str) -> str:
    """The name of a managed key's budget, and of the counter of its month's spend."""
    return f"key:{key_id}"


@functools.lru_cache(maxsize=65536)
def key_counter(key_id: str) -> Budget:
    """The monthly counter of what a managed key and the keys below it spend, kept whether or
    not the key has a budget: its store key is the budget's (`key_budget_name`, a calendar
    month in UTC), so a budget given later, or taken off and given back, starts from the month
    so far, requests still running when it was given included (they settle into it). Charged
    with no block threshold: its limit is never checked (infinite, past what a configured
    budget may be: built without validation)."""
    return Budget.model_construct(name=key_budget_name(key_id), scope="key", match=key_id, limit_usd=math.inf)


ANONYMOUS = Identity("anonymous")
IDENTITY = web.RequestKey("identity", Identity)
MANAGED_KEYS = web.AppKey("managed_keys", KeySource)


def end_watch(request: web.Request, wake: Callable[[], None] | None = None) -> KeyEndWatch | None:
    """For a stream: a check whether its managed key has ended since (None for a key that
    cannot); `wake` is called when it is seen to end (close the watch when the stream ends)."""
    ident = request.get(IDENTITY)
    if ident is None or not ident.managed or (managed := request.app.get(MANAGED_KEYS)) is None:
        return None
    return managed.end_watch(ident.key, wake)


def token_bytes(token: str) -> bytes:
    """The token as the client sent it. Header bytes that are not UTF-8 arrive as lone
    surrogates (`surrogateescape`): they round-trip to the same bytes instead of raising."""
    return token.encode("utf-8", "surrogateescape")


def token_digest(token: str) -> str:
    return hashlib.sha256(token_bytes(token)).hexdigest()


def bearer_token(request: web.Request) -> str | None:
    """The client's token: `Authorization: Bearer …` (scheme in any case) or `x-api-key`."""
    got = request.headers.get("Authorization", "")
    if got[:7].lower() == "bearer ":
        return got[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _refused_key(request: web.Request) -> ProxyError:
    """The 401 for a request without a key this gateway knows: a client that sent none (or
    sent it another way) is told how to send one."""
    if bearer_token(request) is None:
        return ProxyError(
            401,
            "Missing API key: send one of this gateway's keys in the Authorization header (scheme: Bearer) "
            "or in the x-api-key header.",
            code="invalid_api_key",
        )
    return ProxyError(401, "Invalid API key: it is not one of this gateway's keys.", code="invalid_api_key")


class NotYetRead(ProxyError):
    """The 401 for a well-formed managed key this instance has not read: one made or rotated on
    another instance a moment ago. The request path awaits `Access.identify_after_read` and
    answers that (every other caller answers this 401 as it is)."""

    def __init__(self, request: web.Request, token: str, managed: KeySource) -> None:
        refused = _refused_key(request)
        super().__init__(refused.status, refused.message, code=refused.code)
        self.token, self.managed, self.since = token, managed, time.monotonic()


class KeyRing:
    """Digest -> identity, built once from the config."""

    def __init__(self, cfg: Config) -> None:
        self._by_digest: dict[str, Identity] = {}
        self.digests: dict[str, str] = {}  # key id -> its token's digest (what keys it made record)
        for key_id, k in cfg.keys.items():
            digest = k.token_sha256.lower() if k.token_sha256 else token_digest(secrets.resolve(k.token or "").reveal())
            self.digests[key_id] = digest
            region = res.region_of(key_id, k.team) if (res := cfg.governance.residency) else None
            self._by_digest[digest] = Identity(
                key_id,
                k.team,
                k.user,
                k.role,
                k.limits,
                residency=region,
                priority=k.priority,
                priorities=frozenset(k.priorities),
            )

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, token: str | None) -> Identity | None:
        if not token:
            return None
        return self._by_digest.get(token_digest(token))


def check_role(request: web.Request, ident: Identity) -> None:
    """403 unless the key may call the matched admin route: its role must reach the route's
    (undeclared routes: nobody), and a team-bound key reaches only `roles.TEAM_ROUTES`."""
    resource = request.match_info.route.resource
    if resource is None:
        return  # no such route: the router answers 404
    needed = roles.required_role(request.method, resource.canonical)
    if needed is None or not roles.permits(ident.role, needed):
        what = f"a key with role '{needed}' or above" if needed is not None else "a role no key has"
        raise ProxyError(403, f"{request.method} {resource.canonical} needs {what}.", code="permission_denied")
    if ident.team is not None and not roles.team_may(request.method, resource.canonical):
        raise ProxyError(
            403,
            f"{request.method} {resource.canonical} covers every team: it needs a key not bound to a team "
            f"(this key belongs to team '{ident.team}').",
            code="permission_denied",
        )


def tenant_of(request: web.Request) -> str | None:
    """The team whose data alone the caller may read, or None for a caller not confined to one
    (a key without a team, a shared `server.api_keys` key, a keyless sidecar). Every admin
    route in `roles.TEAM_ROUTES` filters its answer by this, in its query."""
    ident = request.get(IDENTITY)
    return ident.team if ident is not None else None


class Access:
    """The access rules of one config generation."""

    def __init__(self, cfg: Config) -> None:
        self.ring = KeyRing(cfg) if cfg.keys else None
        self.shared = [secrets.resolve(k).reveal().encode() for k in cfg.server.api_keys]
        # No keys at all: a sidecar, which must not be driven by web pages or remote admins.
        self.guard = SidecarGuard(cfg.server) if self.ring is None and not self.shared else None
        self.metrics_public = cfg.server.metrics_public

    def check_metrics(self, request: web.Request) -> None:
        """Raises 401/403 unless the caller may read `/metrics`: with keys in use, a key of
        role viewer or above (or a shared `server.api_keys` key), unless `server.metrics_public`;
        without keys, the sidecar's own checks."""
        if self.metrics_public:
            return
        if not self.keyed(request) and not self.shared and self.guard is not None:
            self.guard.check(request)
            return
        ident = self.identify(request)
        if ident is not None and not roles.permits(ident.role, "viewer"):
            raise ProxyError(403, "GET /metrics needs a key with role 'viewer' or above.", code="permission_denied")
        if ident is not None and ident.team is not None:  # its series are every team's (labels team, key)
            raise ProxyError(
                403,
                f"GET /metrics covers every team: it needs a key not bound to a team (this key belongs to team "
                f"'{ident.team}').",
                code="permission_denied",
            )

    def is_shared(self, token: str | None) -> bool:
        """Whether `token` is one of `server.api_keys`, compared in constant time as the bytes
        sent (not UTF-8: a bad key, not a 500). None sent never matches (nor does an empty
        key, refused at load: a request without any key matched it)."""
        return token is not None and any(hmac.compare_digest(token_bytes(token), k) for k in self.shared)

    def shared_actor(self, request: web.Request, secret: bytes) -> str | None:
        """Who a caller with a shared `server.api_keys` key is, for the audit log: `shared:` and
        the first 12 hex of the key's HMAC-SHA256 under `secret` (the governance store's own
        key): the same on every instance of the store, and a copy of the audit alone cannot test
        guesses of a weak key as a bare hash let it. None when the caller sent none of them."""
        token = bearer_token(request)
        if token is None or not self.is_shared(token):
            return None
        return "shared:" + hmac.new(secret, token_bytes(token), hashlib.sha256).hexdigest()[:12]

    def keyed(self, request: web.Request) -> bool:
        """Whether virtual keys are in use (the config's or managed ones)."""
        return self.ring is not None or request.app.get(MANAGED_KEYS) is not None

    def key_of(self, request: web.Request) -> Identity | None:
        """The caller's virtual key, the config's first, then a managed one; None when the
        bearer is none of them. Raises 401 for a managed key revoked or expired."""
        bearer = bearer_token(request)
        ident = self.ring.identify(bearer) if self.ring is not None else None
        managed = request.app.get(MANAGED_KEYS)
        if ident is None and managed is not None and bearer:
            ident = managed.identify(bearer)
        return ident

    def _unknown(self, request: web.Request) -> ProxyError:
        """The 401 for a key this gateway does not know: `NotYetRead` when it is shaped as a
        managed key (the caller may look again after a fresh read)."""
        bearer = bearer_token(request)
        managed = request.app.get(MANAGED_KEYS)
        if managed is not None and bearer and managed.may_be_new(bearer):
            return NotYetRead(request, bearer, managed)
        return _refused_key(request)

    async def identify_after_read(self, request: web.Request, miss: NotYetRead) -> Identity:
        """The caller's managed key once the key store has been read after `miss` (a key made
        or rotated on another instance is served at once, not refused until the next poll);
        raises the 401 still, or 401/403 as `identify` does."""
        ident = await miss.managed.identify_after_read(miss.token, miss.since)
        if ident is None:
            raise _refused_key(request)
        if roles.is_admin_path(request.path):
            check_role(request, ident)
        return ident

    def identify(self, request: web.Request) -> Identity | None:
        """The caller's virtual key (None when keys are not in use); raises 401/403, or
        `NotYetRead` (a 401) for a well-formed managed key not read yet."""
        if roles.is_console_shell(request.path):
            # The console's shell checks its key itself; keyless, it is still a sidecar's.
            if self.guard is not None:
                self.guard.check(request)
            return None
        if self.keyed(request):
            ident = self.key_of(request)
            if ident is None:
                raise self._unknown(request)
            if roles.is_admin_path(request.path):
                check_role(request, ident)
            return ident
        if self.shared:
            if not self.is_shared(bearer_token(request)):
                raise _refused_key(request)
        elif self.guard is not None:
            self.guard.check(request)
        return None
