"""Managed virtual keys: created, changed, rotated and revoked through the admin API,
kept in the database, served from memory.

A token is ``er-<id>.<secret>``: the id finds the key in a dict, and the secret is checked
against a salted keyed hash of it (BLAKE2b with the salt as key) in constant time, so a
request costs one dict lookup and one hash (as much as a config key's SHA-256) and never
touches the database. A slow password hash
would add nothing: secrets are 256 random bits, never chosen by people. Only the salt and
the hash are stored; the secret is shown once, when the key is created or rotated.

Every instance polls one change counter in the database (`governance.key_poll_interval`,
0.25 s by default) and, when it moved, reads only the keys changed since, so a revocation
or rotation made on one instance applies on all of them within that interval. A rotation
may keep the previous secret valid for a grace period. A well-formed token this instance
does not know (a key just made, or just rotated, on another instance) is looked up again
after a fresh read before its 401 (`read_since`): one read in flight per instance, shared by
every request waiting, at most `MISS_READS_PER_S` a second beyond the poll, and a wait of at
most `MISS_WAIT_S`; a known key costs what it did (a dict lookup and a hash).

When the database cannot be read (a partition, PostgreSQL down), this view may hold keys
revoked or downgraded since, with nothing to say so: past `governance.keys_stale_after_s`
without a good read, managed keys are refused (503 `key_store_unavailable`) and `/readyz` is
503, until a read succeeds again. A local SQLite store is read on this machine: never stale.

A key created by a managed key records it as its `parent`, and spends against its parent's
budget (and its parent's parent's, up the chain) besides its own: a key held to $10 can
hand out keys, but all of them together spend at most those $10. A key created by a config
key records `config:<id>`: it takes from that key's limits and `scope: key` budgets, and ends
when that key leaves the config or loses the role or team to make it (`ConfigMaker`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeroute import roles
from edgeroute.capacity import unknown_class
from edgeroute.config import MAX_LIMIT_USD, Budget, Limit
from edgeroute.cost.keys import Identity, key_budget_name, token_bytes
from edgeroute.errors import ProxyError
from edgeroute.governance.store import KEY_READS, AuditOf, GovStore, KeyCap
from edgeroute.governance.write_limit import WriteLimit

log = logging.getLogger("edgeroute.keys")

PREFIX = "er-"
_PUBLIC = (
    "id", "name", "user", "team", "role", "models", "deny_tags", "expires_at", "budget_usd", "rpm", "tpm",
    "max_parallel", "residency", "priority", "priorities", "metadata", "created_at", "created_by", "updated_at",
    "revoked_at", "rotated_at", "grace_until", "parent",
)  # fmt: skip
MAX_DEPTH = 16  # levels of keys below a config key (each level adds a budget to every request)
POLL_DEADLINE_S = 2.0  # a poll not answered by then is a failed one (logged; the next waits for it)
STALE_RETRY_AFTER_S = 5  # the Retry-After of a refusal for a stale view
MISS_WAIT_S = 1.0  # how long a request with an unknown well-formed key waits for a fresh read
MISS_READS_PER_S = 5.0  # reads such requests may start beyond the poll (random tokens: no query each)
_TOKEN = re.compile(r"k[0-9a-f]{12}\.[A-Za-z0-9_-]{43}")  # what `create` and `new_secret` make


_Name = Annotated[str, Field(max_length=200)]
# A request tag or priority class a key names: short, as the values it is compared with are.
_Tag = Annotated[str, Field(min_length=1, max_length=100)]
MAX_TAGS = 100  # denied tags (and 64 priority classes) a key lists: each is in every instance's memory
MAX_MODELS = 256  # models a key lists (each one of the config's)
AUDIT_VALUE_BYTES = 512  # a changed field larger than this is audited as its size and digest
LAST_DATE = 253402300799.0  # 9999-12-31T23:59:59Z


class KeyFields(BaseModel):
    """What a client may set on a managed key (create and update)."""

    # Strict: `"rpm": true` was a limit of 1 and `"budget_usd": "5"` five dollars; a client
    # that sends the wrong type gets a 400 naming the field, as for any other bad value.
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, max_length=200)
    # An empty owner is no owner: `"team": ""` made a key confined to a team nobody is in.
    user: str | None = Field(None, min_length=1, max_length=200)
    team: str | None = Field(None, min_length=1, max_length=200)
    role: roles.Role = "service"
    # Each name at most 200 characters: a key is held in every instance's memory, and a tenant's
    # admin key makes keys; a body of 10 MiB of one model name was a key of 10 MiB.
    # Lists bounded in count and length (a team holds up to governance.max_keys_per_team keys):
    # 1,000 denied tags of 200 characters a key, hundreds of keys, grew every instance by 120 MB.
    models: list[_Name] | None = Field(None, max_length=MAX_MODELS)  # None: every model
    deny_tags: list[_Tag] = Field([], max_length=MAX_TAGS)  # request tags (x-edgeroute-tags) it may not send
    # Bounded: past year 9999 no date prints it (`keys list` ended in a traceback), and a budget
    # past MAX_LIMIT_USD is infinite in nano-dollars (every request of the key was a 500).
    expires_at: float | None = Field(None, gt=0, le=LAST_DATE)  # unix seconds
    budget_usd: float | None = Field(None, gt=0, le=MAX_LIMIT_USD)  # per calendar month
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)  # its requests in flight at once
    residency: str | None = Field(None, min_length=1, max_length=64)
    priority: str | None = Field(None, max_length=64)  # its requests' priority class
    priorities: list[_Tag] = Field([], max_length=64)  # further classes it may ask for (x-edgeroute-priority)
    metadata: dict[str, Any] = {}

    @field_validator("metadata")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(orjson.dumps(v)) > 8192:
            raise ValueError("metadata is limited to 8 KiB of JSON")
        return v


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(n)).rstrip(b"=").decode()


def _mac(salt: bytes, secret: bytes) -> bytes:
    # BLAKE2b in keyed mode is a MAC in one C call: as cheap as the SHA-256 digest of a config key
    # (HMAC-SHA-256 costs several times more in Python's OpenSSL binding).
    return hashlib.blake2b(secret, key=salt, digest_size=32).digest()


def _hash(salt: str, secret: str) -> str:
    return _mac(bytes.fromhex(salt), secret.encode()).hex()


def new_secret(key_id: str) -> tuple[str, str, str]:
    """(token, salt, hash) for a fresh secret of key `key_id`."""
    secret = _b64(32)
    salt = os.urandom(16).hex()
    return f"{PREFIX}{key_id}.{secret}", salt, _hash(salt, secret)


def _ended(data: dict[str, Any], now: float) -> str | None:
    if data.get("revoked_at"):
        return "revoked"
    if data.get("expires_at") and data["expires_at"] <= now:
        return "expired"
    return None


def public(data: dict[str, Any], raw_of: Callable[[str], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """A key as the API shows it. `raw_of` finds its makers: a key whose maker is revoked or
    expired is so too (`status`, and `ended_by` the maker's id)."""
    out = {k: data.get(k) for k in _PUBLIC}
    now = time.time()
    out["source"] = "managed"
    out["status"] = _ended(data, now) or "active"
    if out["status"] == "active" and raw_of is not None:
        for maker in lineage(data, raw_of)[1:]:
            if (ended := _ended(maker, now)) is not None:
                out["status"], out["ended_by"] = ended, maker["id"]
                break
    return out


def _shown(value: Any) -> Any:
    """A field as an audit entry shows it: as it is, or past AUDIT_VALUE_BYTES of JSON its size,
    item count and digest (enough to tell two values apart, never a disk's worth of them)."""
    raw = orjson.dumps(value)
    if len(raw) <= AUDIT_VALUE_BYTES:
        return value
    out: dict[str, Any] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()[:16]}
    if isinstance(value, list | dict):
        out["items"] = len(value)
    return out


def audited(data: dict[str, Any]) -> dict[str, Any]:
    """A key as its creation's audit entry shows it (`public`, large fields as `_shown`)."""
    return {k: _shown(v) for k, v in public(data).items()}


def changed(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a change's audit entry shows: the fields that changed, before and after (`_shown`)."""
    a, b = public(before), public(after)
    names = [k for k in (*_PUBLIC, "status") if a.get(k) != b.get(k)]
    return {k: _shown(a.get(k)) for k in names}, {k: _shown(b.get(k)) for k in names}


def _ancestor_limits(chain: list[dict[str, Any]]) -> tuple[tuple[str, Limit], ...]:
    """The rate limits of each managed key above the chain's first, by id (a key a rate-limited
    key made would otherwise have buckets of its own: ten keys of 3 a minute sent 30)."""
    return tuple((node["id"], lim) for node in chain[1:] if (lim := _limit(node)) is not None)


def lineage(data: dict[str, Any], raw_of: Callable[[str], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The key, then each managed key above it, its maker first (`parent` is set once: never a cycle)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    node: dict[str, Any] | None = data
    while node is not None and node["id"] not in seen:
        seen.add(node["id"])
        out.append(node)
        node = raw_of(node["parent"]) if node.get("parent") else None
    return out


def bad_fields(e: ValidationError) -> ProxyError:
    problems = [{"field": ".".join(str(p) for p in err["loc"]) or "(body)", "error": err["msg"]} for err in e.errors()]
    msg = "; ".join(f"{p['field']}: {p['error']}" for p in problems)
    return ProxyError(400, f"Invalid key fields: {msg}", code="invalid_key", details=problems, details_key="problems")


CONFIG_PARENT = "config:"  # a key made by a config key has `parent: "config:<its id>"`


@dataclass(frozen=True, slots=True)
class ConfigMaker:
    """What a config key passes to the keys it made (and theirs): its role and team bound theirs,
    its rate limits and `scope: key` budgets bound them together with it."""

    role: str
    team: str | None
    limits: Limit | None
    budgets: tuple[Budget, ...]
    digest: str | None = None  # its token's SHA-256 (hex): the keys it made know it by `parent_fp`
    # Its earlier tokens' digests, most recent first, while its id stayed in the config (a
    # rotation this process saw at a reload): the keys they made are carried over, not ended.
    earlier: tuple[str, ...] = ()
    # The fingerprint (`ManagedKeys.maker_print`) of the token it had when an instance last ran
    # with it, when this process started with another (rotated while stopped): likewise.
    earlier_print: str | None = None

    def digests(self) -> tuple[str, ...]:
        return (self.digest, *self.earlier) if self.digest is not None else self.earlier


def config_makers(cfg: Any, digests: Mapping[str, str] | None = None) -> dict[str, ConfigMaker]:
    """The config's keys as makers of managed keys, by id (`digests`: their tokens', by id)."""
    return {
        name: ConfigMaker(
            roles.access_role(k.role),
            k.team,
            k.limits,
            tuple(b for b in cfg.budgets.limits if b.scope == "key" and b.match == name),
            (digests or {}).get(name),
        )
        for name, k in cfg.keys.items()
    }


def maker_fingerprint(digest: str, salt: bytes) -> str:
    """What a key made by a config key records of that key's token (`parent_fp`): a salted keyed
    hash of its digest, as a managed key's own secret is kept. The id alone revived the keys of a
    removed config key when the id was given to someone else, with another token. The salt is
    the config key's own (`ManagedKeys.maker_print`): the same token gives the same fingerprint,
    which the store records (`maker_records`) to know the keys of a token rotated while stopped."""
    return salt.hex() + ":" + _mac(salt, bytes.fromhex(digest)).hex()


def _to_token(was: Callable[[dict[str, Any]], bool], new: str) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    """A key's change from the config maker's token it was made by (`was`) to that of
    fingerprint `new`."""

    def change(before: dict[str, Any] | None) -> dict[str, Any]:
        if before is None:
            raise LookupError("no such key")
        if not was(before):
            return before  # carried over already (by another instance): no write
        return {**before, "parent_fp": new, "parent_fp_was": before["parent_fp"]}

    return change


def _printed(data: dict[str, Any], was: str) -> bool:
    """Whether a key's `parent_fp` is the fingerprint `was` (`ManagedKeys.maker_print`)."""
    return data.get("parent_fp") == was


def _salted_otherwise(data: dict[str, Any], digest: str, fp: str) -> bool:
    """Whether a key was made by the token of `digest` and records it otherwise than as `fp`."""
    return data.get("parent_fp") != fp and _made_by(data, digest)


def _made_by(data: dict[str, Any], digest: str) -> bool:
    """Whether a key's `parent_fp` names the config key's token of `digest`."""
    fingerprint = data.get("parent_fp")
    return isinstance(fingerprint, str) and _same_maker(fingerprint, digest)


def _same_maker(fingerprint: str, digest: str) -> bool:
    salt, _, mac = fingerprint.partition(":")
    try:
        return hmac.compare_digest(_mac(bytes.fromhex(salt), bytes.fromhex(digest)).hex(), mac)
    except ValueError:
        return False


OTHER_TOKEN = "which is back with another token"  # a config key's id reused: its makings stay ended
EARLIER_KEPT = 4  # earlier tokens of a config key whose keys are carried over (rotations in a row)


def carried_over(
    was: dict[str, ConfigMaker] | None, now: dict[str, ConfigMaker]
) -> tuple[dict[str, ConfigMaker], dict[str, tuple[str, str]]]:
    """`now`, each config key that stayed in the config knowing the tokens it had (a token
    rotated through its `file:`/`env:`/`exec:` reference keeps the keys it made), and the
    rotations seen: id -> (old digest, new digest). An id that was gone from `was` (removed: its
    keys ended) and is back with another token knows none: its keys stay ended."""
    out, rotated = dict(now), {}
    for name, maker in now.items():
        old = (was or {}).get(name)
        if old is None or maker.digest is None:
            continue
        if old.digest is not None and old.digest != maker.digest:
            rotated[name] = (old.digest, maker.digest)
        earlier = tuple(d for d in old.digests() if d != maker.digest)[:EARLIER_KEPT]
        out[name] = dataclasses.replace(maker, earlier=earlier, earlier_print=old.earlier_print)
    return out, rotated


def _config_maker_ends(chain: list[dict[str, Any]], makers: dict[str, ConfigMaker] | None) -> str | None:
    """Why the keys of `chain` (a key and its managed makers) end with their config maker: it is
    gone from the config, or no longer has the role or team to make them (None: they do not)."""
    parent = chain[-1].get("parent")
    if makers is None or not isinstance(parent, str) or not parent.startswith(CONFIG_PARENT):
        return None
    name = parent[len(CONFIG_PARENT) :]
    maker = makers.get(name)
    if maker is None:
        return f"config key {name}, which is no longer in the config"
    # Keys made before `parent_fp` was recorded know their maker by its id alone. One carried
    # over to a rotated token keeps the token before (`parent_fp_was`) for instances not reloaded yet.
    prints = [f for f in (chain[-1].get("parent_fp"), chain[-1].get("parent_fp_was")) if isinstance(f, str)]
    known = maker.earlier_print in prints
    if prints and not known and not any(_same_maker(f, d) for f in prints for d in maker.digests()):
        return f"config key {name}, {OTHER_TOKEN}"
    if any(roles.rank(roles.access_role(n.get("role"))) > roles.rank(maker.role) for n in chain):
        return f"config key {name}, whose role no longer allows it"
    if maker.team is not None and any(n.get("team") != maker.team for n in chain):
        return f"config key {name}, which is no longer of its team"
    return None


@dataclass(slots=True)
class _Entry:
    salt: bytes
    hash: bytes
    prev_salt: bytes | None
    prev_hash: bytes | None
    grace_until: float
    expires_at: float | None
    revoked: bool
    identity: Identity
    # A maker's revocation or expiry ends the keys below it: a leaked key's holder minted keys
    # that outlived its revocation. The revoked maker's id; the earliest-expiring maker's.
    revoked_above: str | None = None
    expires_above: tuple[str, float] | None = None
    # Made (itself or a maker) by a config key since removed or demoted: why, for its 401.
    config_ended: str | None = None


def _why_ended(key_id: str, e: _Entry, now: float) -> tuple[str, str] | None:
    """Why a key is refused at `now` (its 401's message and code), None while it works."""
    if e.revoked:
        return f"API key {key_id} has been revoked.", "key_revoked"
    if e.expires_at is not None and now >= e.expires_at:
        return f"API key {key_id} has expired.", "key_expired"
    if e.revoked_above is not None:
        return f"API key {key_id} was made by key {e.revoked_above}, which has been revoked.", "key_revoked"
    if e.expires_above is not None and now >= e.expires_above[1]:
        return f"API key {key_id} was made by key {e.expires_above[0]}, which has expired.", "key_expired"
    if e.config_ended is not None:
        return f"API key {key_id} was made by {e.config_ended}.", "key_revoked"
    return None


def key_budget(data: dict[str, Any]) -> Budget | None:
    """The monthly budget a key's `budget_usd` sets (named for the key: its counters' name)."""
    usd = data.get("budget_usd")
    return Budget(name=key_budget_name(data["id"]), scope="key", match=data["id"], limit_usd=usd) if usd else None


def _limit(data: dict[str, Any]) -> Limit | None:
    fields = {f: data[f] for f in ("rpm", "tpm", "max_parallel") if data.get(f)}
    return Limit(**fields) if fields else None


def _entry(
    data: dict[str, Any],
    residency: str | None,
    budgets: tuple[Budget, ...],
    ancestor_limits: tuple[tuple[str, Limit], ...] = (),
    spends_for: tuple[str, ...] = (),
    share_root: str | None = None,
) -> _Entry:
    limits = _limit(data)
    models = data.get("models")
    ident = Identity(
        data["id"],
        data.get("team"),
        data.get("user"),
        data.get("role"),
        limits,
        residency=residency,
        budgets=budgets,
        spends_for=spends_for or (data["id"],),
        ancestor_limits=ancestor_limits,
        models=frozenset(models) if models is not None else None,
        deny_tags=frozenset(data.get("deny_tags") or ()),
        priority=data.get("priority"),
        priorities=frozenset(data.get("priorities") or ()),
        managed=True,
        share_root=share_root,
    )
    prev_salt, prev_hash = data.get("prev_salt"), data.get("prev_hash")
    return _Entry(
        bytes.fromhex(data["salt"]),
        bytes.fromhex(data["hash"]),
        bytes.fromhex(prev_salt) if prev_salt else None,
        bytes.fromhex(prev_hash) if prev_hash else None,
        float(data.get("grace_until") or 0),
        data.get("expires_at"),
        bool(data.get("revoked_at")),
        ident,
    )


class ManagedKeys:
    """The in-memory view of the managed keys, kept current by :meth:`poll`."""

    def __init__(self, store: GovStore, region_of: Any = None, stale_after: float = 30.0) -> None:
        self.store = store
        # When the view was last known current (the start of the last read that succeeded), and
        # how old it may grow before managed keys are refused: a local SQLite file is never stale.
        self.last_good = time.monotonic()
        self.stale_after = stale_after if store.dialect == "postgres" else math.inf
        self.poll_failures = 0  # polls that failed or passed POLL_DEADLINE_S
        self._by_id: dict[str, _Entry] = {}
        # The config's keys, as makers of managed keys (None: not known, as in tools and tests).
        self.makers: dict[str, ConfigMaker] | None = None
        self.writes = WriteLimit()  # key changes a minute per writer (`set_writes` with shared state)
        self._raw: dict[str, dict[str, Any]] = {}
        self._children: dict[str, list[str]] = {}  # parent id -> the keys it created
        self.seq = 0
        # (key id, team, own residency) -> effective region, from the running config
        self._region_of = region_of or (lambda key_id, team, own: own)
        # Keys ended (revoked or expired, or made by a key that is), and those seen to end since
        # `settle` last ran: `on_ended` is told of them (the response cache drops what they
        # stored). Keys that had ended before this process read them are not news: an instance
        # that saw them end did that then. `_next_expiry`: when the next key's expiry comes.
        self._gone: frozenset[str] = frozenset()
        self._other_tokens: set[str] = set()  # config makers back with another token, said once
        # Config makers' rotated tokens, not yet carried over: which keys the token before made,
        # and the digest of the new one. The store records each one's token (`maker_records`)
        # once they are: `_records_due` when the config's keys changed since.
        self._rotated: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {}
        self._records_due = False
        self._makers_key: bytes | None = None
        # Config keys whose keys may hold a fingerprint of a random salt (made before the store
        # recorded tokens), by digest: given the config key's own at the first poll, so that a
        # rotation while stopped finds them too.
        self._legacy: dict[str, str] = {}
        self.ended_gen = 0  # moves each time keys are seen to end: open streams look then
        self._newly_gone: set[str] = set()
        self._next_expiry = math.inf
        self._next_drop = math.inf  # when the next key whose lists are held expires (`_drop_expired_lists`)
        self._gone_lock = threading.Lock()
        self._loaded = False
        self.on_ended: list[Callable[[list[str]], Awaitable[Any]]] = []
        self._wakes: dict[str, set[_EndWatch]] = {}  # key id -> its open streams' watches (`end_watch`)
        # The read in flight, the poll's or another's (one at a time: two loads at once raced
        # on the view), and the reads started for unknown keys, capped by a token bucket.
        self._read: asyncio.Future[None] | None = None
        self.miss_reads = 0
        self._miss_read_at = -math.inf

    def __len__(self) -> int:
        return sum(1 for e in self._by_id.values() if not e.revoked)

    def load(self) -> None:
        """Reads what changed since the last call (blocking: run it off the event loop)."""
        started = time.monotonic()  # what is read is at least this recent
        seq = self.store.keys_seq()
        if seq == self.seq:
            self._drop_expired_lists()
            self._loaded = True
            self.last_good = started
            return
        now = time.time()
        for row_seq, data in self.store.keys_since(self.seq):
            self._raw[data["id"]] = _kept(data, now)
            self.seq = max(self.seq, row_seq)
            if (until := _own_expiry(data)) is not None:
                self._next_drop = min(self._next_drop, until)
        self.seq = max(self.seq, seq)
        self._drop_expired_lists()
        self._rebuild()  # a changed budget reaches every key below it
        self._loaded = True
        self.last_good = started

    def _drop_expired_lists(self) -> None:
        """Drops the lists and metadata of keys that expired since (as revoked keys' are, read
        from the store): once per expiry at most, at the poll's read, never on a request. A flood
        of short-lived keys kept every one's lists until a restart. An expired key comes back
        only by a change of its own row, which is read whole."""
        now = time.time()
        if now < self._next_drop:
            return
        next_drop = math.inf
        for key_id, data in list(self._raw.items()):
            if (until := _own_expiry(data)) is None:
                continue
            if until > now:
                next_drop = min(next_drop, until)
                continue
            self._raw[key_id] = _kept(data, now)
            if (e := self._by_id.get(key_id)) is not None:  # refused by `identify`: its lists unread
                e.identity = dataclasses.replace(
                    e.identity, models=frozenset(), deny_tags=frozenset(), priorities=frozenset()
                )
        self._next_drop = next_drop

    def set_region_of(self, region_of: Any, makers: dict[str, ConfigMaker] | None = None) -> None:
        """A reload can change team residencies and the config's keys: recompute every key's
        region, and what the keys config keys made inherit from them (`makers`, when given)."""
        self._region_of = region_of
        if makers is not None:
            self.makers, rotated = carried_over(self.makers, makers)
            for name, (old, new) in rotated.items():  # written to the store at the next poll (`carry_over`)
                self._rotated[name] = (functools.partial(_made_by, digest=old), new)
            self._records_due = True
        self._rebuild()

    def _rebuild(self) -> None:
        by_id = {}
        children: dict[str, list[str]] = {}
        for key_id, data in self._raw.items():
            region = self._region_of(key_id, data.get("team"), data.get("residency"))
            chain = self._chain(data)
            budgets = tuple(b for node in chain if (b := key_budget(node)) is not None)
            spends_for = tuple(node["id"] for node in chain)
            limits = _ancestor_limits(chain)
            maker = self._config_maker(chain)
            share_root = None
            if maker is not None:  # the config key that made the chain bounds it as a managed maker would
                name, made_by = maker
                budgets += made_by.budgets
                limits += ((name, made_by.limits),) if made_by.limits is not None else ()
                share_root = name if made_by.team is not None else None  # (`Identity.share_root`)
            entry = by_id[key_id] = _entry(data, region, budgets, limits, spends_for, share_root)
            entry.config_ended = _config_maker_ends(chain, self.makers)
            makers = chain[1:]
            entry.revoked_above = next((m["id"] for m in makers if m.get("revoked_at")), None)
            expiring = [(m["id"], float(m["expires_at"])) for m in makers if m.get("expires_at")]
            entry.expires_above = min(expiring, key=lambda e: e[1]) if expiring else None
            if data.get("parent"):
                children.setdefault(data["parent"], []).append(key_id)
        self._by_id, self._children = by_id, children
        self._say_other_tokens()
        self._see_ends()

    def _say_other_tokens(self) -> None:
        """Logs a config key's id put back with another token (given to someone else): the keys
        its earlier token made stay ended, where the same token back would restore them."""
        counts: dict[str, int] = {}
        for e in self._by_id.values():
            if e.config_ended is not None and e.config_ended.endswith(OTHER_TOKEN):
                counts[e.config_ended] = counts.get(e.config_ended, 0) + 1
        for maker in sorted(counts.keys() - self._other_tokens):
            log.warning(
                "managed keys: %d key(s) made by %s stay ended: only the token that made them restores them",
                counts[maker],
                maker,
            )
        self._other_tokens = set(counts)

    def _see_ends(self) -> None:
        """Which keys have ended now; those that had not at the last look are news."""
        now = time.time()
        gone: set[str] = set()
        next_expiry = math.inf
        for k, e in self._by_id.items():
            if e.revoked or e.revoked_above is not None or e.config_ended is not None:
                gone.add(k)
                continue
            until = min(e.expires_at or math.inf, e.expires_above[1] if e.expires_above else math.inf)
            if until <= now:
                gone.add(k)
            else:
                next_expiry = min(next_expiry, until)
        with self._gone_lock:
            if self._loaded:
                self._newly_gone |= gone - self._gone
                _say_config_ends(self._by_id, gone - self._gone)
            if not gone <= self._gone:
                self.ended_gen += 1  # streams of the keys that ended look (`end_watch`)
            self._gone, self._next_expiry = frozenset(gone), next_expiry

    async def settle(self) -> None:
        """Tells `on_ended` of the keys seen revoked or expired since the last call (run after
        `load`, and at each poll: an expiry is seen within the poll interval)."""
        if time.time() >= self._next_expiry:
            self._see_ends()  # one pass over the keys, only when an expiry has come
        with self._gone_lock:
            ended, self._newly_gone = sorted(self._newly_gone), set()
        if not ended:
            return
        if self._wakes:  # open streams of those keys, their upstream silent or not
            for key_id in ended:
                for watch in list(self._wakes.get(key_id, ())):
                    watch.woken()
        for fn in self.on_ended:
            try:
                await fn(ended)
            except Exception:
                log.exception("managed keys: a revocation's follow-up failed")

    def _config_maker(self, chain: list[dict[str, Any]]) -> tuple[str, ConfigMaker] | None:
        """The config key at the top of `chain`, when one made it and is still in the config."""
        parent = chain[-1].get("parent")
        if self.makers is None or not isinstance(parent, str) or not parent.startswith(CONFIG_PARENT):
            return None
        name = parent[len(CONFIG_PARENT) :]
        return (name, self.makers[name]) if name in self.makers else None

    def config_ended(self, key_id: str) -> str | None:
        """Why a key ended with the config key that made it (or its makers), if it did."""
        e = self._by_id.get(key_id)
        return e.config_ended if e is not None else None

    def has_ended(self, key_id: str) -> bool:
        """Whether the key is seen ended (revoked, expired, or a maker's end ended it)."""
        return key_id in self._gone

    def ended_with_maker(self, key_id: str) -> bool:
        """Whether the key is seen ended by a maker's end, which its own row does not show (a
        key's own revocation and expiry are read from the row, where a change just written
        may have given it a later one)."""
        e = self._by_id.get(key_id)
        if e is None:
            return False
        above = e.expires_above is not None and time.time() >= e.expires_above[1]
        return e.revoked_above is not None or e.config_ended is not None or above

    def kept_ended(self, key_id: str, until: float | None) -> dict[str, float]:
        """The keys below `key_id` whose own rows are live but that ended with its expiry
        (`until`, from its current row) or a maker's between them and it, by id, and when
        (the earliest of those expiries): what a later expiry given to `key_id` would revive."""
        now = time.time()
        out: dict[str, float] = {}
        for below in self.spenders(key_id):
            data = self._raw.get(below)
            if below == key_id or data is None or _ended(data, now) is not None:
                continue
            ends = []
            for node in lineage(data, self._raw.get)[1:]:
                if node.get("revoked_at"):
                    break  # ended for good by a revocation: nothing to keep
                at = until if node["id"] == key_id else node.get("expires_at")
                if at is not None and float(at) <= now:
                    ends.append(float(at))
                if node["id"] == key_id:
                    if ends:
                        out[below] = min(ends)
                    break
        return out

    def live(self, team: str | None) -> int:
        """The keys of `team` (None: of no team) that have not ended."""
        gone = self._gone
        return sum(1 for k, data in self._raw.items() if data.get("team") == team and k not in gone)

    def _chain(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The key, then each managed key above it (whose budgets, if any, it spends too)."""
        return lineage(data, self._raw.get)

    # -- budgets, for cost control (`edgeroute.cost.keys.KeySource`) -----------------------

    def budgets(self) -> list[Budget]:
        """Every key's own budget (revoked keys too: what their children spend still counts)."""
        return [b for data in self._raw.values() if (b := key_budget(data)) is not None]

    def names(self) -> dict[str, str]:
        return {k: n for k, data in self._raw.items() if isinstance(n := data.get("name"), str)}

    def ended(self) -> dict[str, str]:
        """The keys that no longer work, by id: `revoked` or `expired`, theirs or a maker's (as
        `public` says), for the budgets view, which still lists their spend."""
        now = time.time()
        out = {}
        for key_id, data in self._raw.items():
            for node in lineage(data, self._raw.get):
                if (why := _ended(node, now)) is not None:
                    out[key_id] = why
                    break
            else:
                if self.config_ended(key_id) is not None:
                    out[key_id] = "revoked"
        return out

    def shown(self, data: dict[str, Any]) -> dict[str, Any]:
        """A key as the API shows it (`public`), ended too when the config key that made it is gone.
        A key the view holds without its lists (`_kept`: ended) says so, `"lists": "dropped: expired"`,
        rather than showing none: `GET /admin/keys/{id}` reads them from the store."""
        out = public(data, self.raw)
        if (why := _ended(data, time.time())) is not None and any(f not in data for f in _BULKY):
            for f in _BULKY:
                out.pop(f, None)
            out["lists"] = f"dropped: {why}"
        if out["status"] == "active" and self.config_ended(data["id"]) is not None:
            out["status"], out["ended_by"] = "revoked", lineage(data, self.raw)[-1].get("parent")
        return out

    def key_ids(self) -> list[str]:
        """Every key (revoked keys too: what their children spend still counts)."""
        return list(self._raw)

    def key_teams(self) -> dict[str, str | None]:
        return {k: data.get("team") for k, data in self._raw.items()}

    def teams(self) -> set[str]:
        return {t for data in self._raw.values() if (t := data.get("team"))}

    def limits(self) -> dict[str, Limit]:
        return {k: e.identity.limits for k, e in self._by_id.items() if e.identity.limits is not None}

    def depth(self, key_id: str) -> int:
        """How many managed keys the chain from `key_id` up to a config key holds (itself included)."""
        n, node = 0, self._raw.get(key_id)
        seen: set[str] = set()
        while node is not None and node["id"] not in seen:
            seen.add(node["id"])
            n += 1
            node = self._raw.get(node["parent"]) if node.get("parent") else None
        return n

    def spenders(self, key_id: str) -> list[str]:
        """The keys whose spend counts against `key_id`'s budget: itself and its descendants."""
        children = self._children
        out, todo = {key_id}, [key_id]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in out:
                    out.add(child)
                    todo.append(child)
        return sorted(out)

    def identify(self, token: str) -> Identity | None:
        """The key of `token`, None when it is not a valid managed key; a valid secret of a
        revoked or expired key is a 401 that says so; any managed key, a 503 while the view is
        past its bound (`stale_for`)."""
        if not token.startswith(PREFIX):
            return None
        if (stale := self.stale_for()) is not None:
            raise ProxyError(
                503,
                f"edgeroute cannot read its key store (last read {stale:.0f} s ago), so it cannot tell whether "
                "this key is still valid; managed keys are refused until it can. Retry shortly.",
                code="key_store_unavailable",
                headers={"Retry-After": str(STALE_RETRY_AFTER_S)},
            )
        key_id, _, secret = token[len(PREFIX) :].partition(".")
        e = self._by_id.get(key_id)
        if e is None or not secret:
            return None
        now = time.time()
        given = token_bytes(secret)
        if not hmac.compare_digest(_mac(e.salt, given), e.hash):
            if e.prev_salt is None or e.prev_hash is None or now >= e.grace_until:
                return None
            if not hmac.compare_digest(_mac(e.prev_salt, given), e.prev_hash):
                return None
        if (why := _why_ended(key_id, e, now)) is not None:
            raise ProxyError(401, why[0], code=why[1])
        return e.identity

    def maker_print(self, name: str, digest: str) -> str:
        """The fingerprint keys made by config key `name` with the token of `digest` record (and
        the store, of the token it runs with): salted with the config key's own salt, derived
        from the store's key (blocking the first time)."""
        if self._makers_key is None:
            self._makers_key = self.store.makers_key()
        return maker_fingerprint(digest, _mac(self._makers_key, name.encode())[:16])

    def restarted(self) -> None:
        """At the start, before the first `load` (blocking): a config key whose token is not the
        one an instance last ran with (`maker_records`) was rotated while stopped, as through a
        reload: its keys are known by the token before and carried over at the next poll. A
        config key removed (at a reload or a start) has no record, so an id given to another
        token while stopped still ends them."""
        self._makers_key = self.store.makers_key()  # not on the loop at a key's creation
        records = self.store.maker_records()
        for name, maker in (self.makers or {}).items():
            was = records.get(name)
            if maker.digest is not None and (was is None or _same_maker(was, maker.digest)):
                self._legacy[name] = maker.digest
            if was is None or maker.digest is None or _same_maker(was, maker.digest):
                continue
            self.makers = {**(self.makers or {}), name: dataclasses.replace(maker, earlier_print=was)}
            self._rotated[name] = (functools.partial(_printed, was=was), maker.digest)
        self._write_records()

    def _write_records(self) -> None:
        """Records the token each config key runs with (not a rotated one's before its keys are
        carried over: a restart meanwhile still knows them), and drops removed ones' records."""
        records = self.store.maker_records()
        want = {
            name: self.maker_print(name, m.digest)
            for name, m in (self.makers or {}).items()
            if m.digest is not None and name not in self._rotated
        }
        drop = [n for n in records if n not in (self.makers or {})]
        self.store.set_maker_records({n: v for n, v in want.items() if records.get(n) != v}, drop)
        self._records_due = False

    def carry_over(self) -> None:
        """Records in the store each rotated config key's new token on the keys its old one made
        (blocking), so that a restart or another instance (which know only the new token) keeps
        them; the old one stays as `parent_fp_was` for instances not reloaded yet. Audited once a
        config key (`key.maker_token_changed`). A failure is logged and tried at the next poll."""
        for name, digest in list(self._legacy.items()):  # quietly: the same token, its own salt
            fp = self.maker_print(name, digest)
            if self._move(name, functools.partial(_salted_otherwise, digest=digest, fp=fp), fp) is None:
                return
            del self._legacy[name]
        for name, (was, new) in list(self._rotated.items()):
            parent = CONFIG_PARENT + name
            if (moved := self._move(name, was, self.maker_print(name, new))) is None:
                return
            if moved:
                self.store.audit("server", "key.maker_token_changed", parent, None, {"keys_carried_over": moved})
            log.warning(
                "managed keys: config key %s has a new token: %d key(s) it made carried over to it", name, moved
            )
            del self._rotated[name]
            self._records_due = True
        if self._records_due:
            try:
                self._write_records()
            except Exception:
                log.exception("managed keys: recording the config keys' tokens failed")

    def _move(self, name: str, was: Callable[[dict[str, Any]], bool], new: str) -> int | None:
        """Records fingerprint `new` on the keys config key `name` made that `was` matches (the
        one before kept as `parent_fp_was`); how many were written, None on a failure (logged)."""
        parent = CONFIG_PARENT + name
        made = [k for k, d in self._raw.items() if d.get("parent") == parent and d.get("parent_fp") and was(d)]
        moved, change = 0, _to_token(was, new)
        for key_id in made:
            try:
                before, after = self.store.change_key(key_id, change)
            except LookupError:
                continue  # no longer in the store
            except Exception:
                log.exception("managed keys: carrying keys over to config key %s's token failed", name)
                return None
            moved += after is not before
        return moved

    def end_watch(self, key_id: str, wake: Callable[[], None] | None = None) -> _EndWatch:
        """For a stream of `key_id`: (message, code) once the key is seen ended (revoked, expired,
        or with a maker), else None. O(1) a call: the key is looked up only when keys have been
        seen to end since the last call (`ended_gen`), at most once a poll. A key seen ended
        already (revoked while the upstream had not yet answered) is looked up at the first call.
        `wake` is called (on the loop, by `settle`) when the key is seen ended: a stream whose
        upstream is silent learns of it then, not at its next events. Closed when the stream ends."""
        with self._gone_lock:  # `_see_ends` moves the count, then the set
            seen = -1 if key_id in self._gone else self.ended_gen
        watch = _EndWatch(self, key_id, seen, wake)
        if wake is not None:
            self._wakes.setdefault(key_id, set()).add(watch)
            if seen == -1:
                watch.woken()  # ended before its stream began: no `settle` will tell of it again
        return watch

    def _why(self, key_id: str) -> tuple[str, str] | None:
        if key_id not in self._gone or (e := self._by_id.get(key_id)) is None:
            return None
        return _why_ended(key_id, e, math.inf) or (f"API key {key_id} has ended.", "key_revoked")

    def may_be_new(self, token: str) -> bool:
        """Whether a token `identify` refused is shaped as this store's keys are: one made or
        rotated on another instance since the last read (a malformed one is refused at once)."""
        return token.startswith(PREFIX) and _TOKEN.fullmatch(token, len(PREFIX)) is not None

    async def identify_after_read(self, token: str, since: float) -> Identity | None:
        """`identify` once a read started at or after `since` (monotonic) has come in, or after
        MISS_WAIT_S without one (the view as it is then)."""
        await self.read_since(since, MISS_WAIT_S, miss=True)
        return self.identify(token)

    async def read_since(self, since: float, within: float, miss: bool = False) -> bool:
        """Waits at most `within` s for a good read started at or after `since` (monotonic):
        the one in flight if it started then, else a new one. For a `miss` (an unknown key), a
        new read only every 1/MISS_READS_PER_S s, else the next one anyone starts (the poll's).
        False when none came in time, or the read failed (the poll logs and counts that)."""
        end = time.monotonic() + within
        while self.last_good < since:
            left = end - time.monotonic()
            if left <= 0:
                return False
            read = self._read
            if read is None or read.done():
                now = time.monotonic()
                if miss and now - self._miss_read_at < 1 / MISS_READS_PER_S:
                    await asyncio.sleep(min(left, 1 / MISS_READS_PER_S))
                    continue
                if miss:
                    self._miss_read_at, self.miss_reads = now, self.miss_reads + 1
                read = self._reading()
            try:
                await asyncio.wait_for(asyncio.shield(read), left)
            except Exception:
                return False
        return True

    def _reading(self) -> asyncio.Future[None]:
        """The read in flight, or a new one: one at a time, whoever asks (the poll, a change's
        read-back, an unknown key)."""
        if self._read is None or self._read.done():
            self._read = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(KEY_READS, self.load))
            self._read.add_done_callback(_retrieved)
        return self._read

    def raw(self, key_id: str) -> dict[str, Any] | None:
        return self._raw.get(key_id)

    def all(self) -> list[dict[str, Any]]:
        return list(self._raw.values())

    def stale_for(self) -> float | None:
        """Seconds since the view was last known current, once past `stale_after` (else None)."""
        age = time.monotonic() - self.last_good
        return age if age > self.stale_after else None

    async def follow(self, interval: float, stale_after: Callable[[], float] | None = None) -> None:
        """Polls the change counter until cancelled. A poll gets POLL_DEADLINE_S: one that fails
        or passes it is logged (once an outage) and counted, and the next waits for the same read
        (a hung read is not started again, each holding a thread). `stale_after`: the running
        config's bound, read at each poll (a reload changes it)."""
        outage = _Outage(self)
        try:
            while True:
                await asyncio.sleep(interval)
                if stale_after is not None and self.store.dialect == "postgres":
                    self.stale_after = stale_after()
                read = self._reading()  # a hung one is waited for again, not started anew
                try:
                    await asyncio.wait_for(asyncio.shield(read), POLL_DEADLINE_S)
                except TimeoutError:
                    outage.failed(read, f"no answer within {POLL_DEADLINE_S:g} s")
                    continue
                except Exception as e:
                    outage.failed(read, type(e).__name__)
                    continue
                await self.settle()
                if self._rotated or self._records_due or self._legacy:
                    await asyncio.get_running_loop().run_in_executor(KEY_READS, self.carry_over)
                if self.stale_for() is None:  # a hung read come back late: the next one is current
                    outage.ended()
        finally:
            if self._read is not None:
                self._read.cancel()  # a read still hung at shutdown: nobody waits for it now


class _EndWatch:
    """A stream's look at its managed key (`ManagedKeys.end_watch`): called, (message, code)
    once the key is seen ended since the last call, else None."""

    __slots__ = ("_key_id", "_keys", "_seen", "_wake")

    def __init__(self, keys: ManagedKeys, key_id: str, seen: int, wake: Callable[[], None] | None) -> None:
        self._keys, self._key_id, self._seen, self._wake = keys, key_id, seen, wake

    def __call__(self) -> tuple[str, str] | None:
        if (gen := self._keys.ended_gen) == self._seen:
            return None
        self._seen = gen
        return self._keys._why(self._key_id)

    def why(self) -> tuple[str, str] | None:
        """Why the key has ended, if it has (whatever was seen before)."""
        return self._keys._why(self._key_id)

    def woken(self) -> None:
        if self._wake is not None:
            try:
                self._wake()
            except Exception:
                log.exception("managed keys: waking a stream of ended key %s failed", self._key_id)

    def close(self) -> None:
        """The stream has ended: no more waking."""
        if self._wake is not None:
            self._wake = None
            wakes = self._keys._wakes
            if (watches := wakes.get(self._key_id)) is not None:
                watches.discard(self)
                if not watches:
                    del wakes[self._key_id]


# What a revoked key keeps in memory: what its 401 and its makers' and children's views need
# (a revoked key's lists and metadata are read from the store by `GET /admin/keys/{id}`).
def _say_config_ends(by_id: dict[str, Any], ended: set[str]) -> None:
    """Logs the keys a reload ended with their config-key maker (removed, demoted or moved):
    a typo in a key's id ends every key it made, silently until now."""
    makers: dict[str, int] = {}
    for k in ended:
        if (e := by_id.get(k)) is not None and e.config_ended is not None:
            makers[e.config_ended] = makers.get(e.config_ended, 0) + 1
    for maker, n in sorted(makers.items()):
        log.warning(
            "managed keys: %d key(s) ended, made by %s (putting it back as it was restores them;"
            " revoke them to end them for good)",
            n,
            maker,
        )


_BULKY = ("models", "deny_tags", "priorities", "metadata")


def _kept(data: dict[str, Any], now: float) -> dict[str, Any]:
    """A key as the view holds it: a revoked or expired one without its lists and metadata,
    which no request reads (revoking hundreds of keys with 1,000 tags each freed nothing)."""
    if _ended(data, now) is None:
        return data
    return {k: v for k, v in data.items() if k not in _BULKY}


def _own_expiry(data: dict[str, Any]) -> float | None:
    """When a key that still holds its lists expires (None: it does not, or holds none)."""
    until = data.get("expires_at")
    if not until or data.get("revoked_at") or not any(f in data for f in _BULKY):
        return None
    return float(until)


def _retrieved(read: asyncio.Future[None]) -> None:
    """Marks a read's failure as seen: the poll logs it, whoever started the read."""
    if not read.cancelled():
        read.exception()


class _Outage:
    """The key poll's failures: counted, and logged once when they start, once when the view
    passes its bound (managed keys refused from then), and once when a read succeeds again."""

    def __init__(self, keys: ManagedKeys) -> None:
        self.keys = keys
        self.since: float | None = None  # the first failure's time (monotonic)
        self.counted: asyncio.Future[None] | None = None  # the read counted last (a hung one once)
        self.refusing = False

    def failed(self, read: asyncio.Future[None], why: str) -> None:
        if read is not self.counted:
            self.counted = read
            self.keys.poll_failures += 1
        if self.since is None:
            self.since = time.monotonic()
            bound = self.keys.stale_after
            until = f"for at most {bound:g} s (governance.keys_stale_after_s)" if bound < math.inf else "meanwhile"
            log.error("managed keys: cannot read the key store (%s); serving the keys as last read %s", why, until)
        if not self.refusing and (stale := self.keys.stale_for()) is not None:
            self.refusing = True
            log.error(
                "managed keys: no good read of the key store for %.0f s (governance.keys_stale_after_s: %g); "
                "refusing managed keys (503) until it answers",
                stale,
                self.keys.stale_after,
            )

    def ended(self) -> None:
        if self.since is not None:
            down = time.monotonic() - self.since
            log.warning("managed keys: the key store answers again after %.1f s; changes read, keys served", down)
        self.since, self.counted, self.refusing = None, None, False


# -- changes (blocking: run off the event loop) -----------------------------------------------


def check_scope(creator: Identity | None, creator_raw: dict[str, Any] | None, f: KeyFields) -> None:
    """A key cannot give more than it has: role, budget, rate limits, expiry, models, denied
    tags, team, user, residency, priority classes."""
    if creator is None:
        return  # loopback without keys, or the CLI on the database: the operator of the machine
    mine = roles.access_role(creator.role)
    if roles.rank(f.role) > roles.rank(mine):
        raise ProxyError(
            403, f"A key with role '{mine}' cannot create a key with role '{f.role}'.", code="permission_denied"
        )
    own = creator_raw or {}
    limits = creator.limits
    checks: list[tuple[str, float | None, float | None]] = [
        ("budget_usd", own.get("budget_usd"), f.budget_usd),
        ("rpm", limits.rpm if limits else None, f.rpm),
        ("tpm", limits.tpm if limits else None, f.tpm),
        ("max_parallel", limits.max_parallel if limits else None, f.max_parallel),
    ]
    for name, have, theirs in checks:
        if have is not None and (theirs is None or theirs > have):
            raise ProxyError(
                403, f"The new key's {name} must be set and at most this key's ({have:g}).", code="permission_denied"
            )
    # A key given for a while gives no longer: a key it made (or itself) outliving it would
    # keep its access past its expiry.
    have_until = own.get("expires_at")
    if have_until is not None and (f.expires_at is None or f.expires_at > have_until):
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(have_until))
        raise ProxyError(
            403, f"The new key's expires_at must be set and at most this key's ({until}).", code="permission_denied"
        )
    if own.get("models") is not None and (f.models is None or not set(f.models) <= set(own["models"])):
        raise ProxyError(403, "The new key's models must be among this key's models.", code="permission_denied")
    if creator.deny_tags and not creator.deny_tags <= set(f.deny_tags):
        denied = ", ".join(sorted(creator.deny_tags))
        raise ProxyError(403, f"The new key's deny_tags must include this key's ({denied}).", code="permission_denied")
    # A team's keys spend against its budgets: another team (or none) would escape them.
    if creator.team is not None and f.team != creator.team:
        raise ProxyError(403, f"The new key must keep this key's team '{creator.team}'.", code="permission_denied")
    # Likewise a user's: a `scope: user` budget bounds the keys bound to that user alone.
    if creator.user is not None and f.user != creator.user:
        raise ProxyError(403, f"The new key must keep this key's user '{creator.user}'.", code="permission_denied")
    if creator.residency is not None and f.residency != creator.residency:
        raise ProxyError(
            403, f"The new key must keep this key's residency '{creator.residency}'.", code="permission_denied"
        )
    # Priority classes reach capacity held back for them: a managed key hands out only its own
    # (a key from the config file is the operator's, as for budgets above).
    if creator_raw is not None:
        classes: set[str] = {c for c in (own.get("priority"), *(own.get("priorities") or ())) if c}
        wanted = {c for c in (f.priority, *f.priorities) if c}
        if not wanted <= classes:
            mine_classes = ", ".join(sorted(classes)) or "none but the default"
            raise ProxyError(
                403,
                f"The new key's priority classes must be among this key's ({mine_classes}).",
                code="permission_denied",
            )


def check_classes(f: KeyFields, classes: list[str]) -> None:
    """A key's classes must be configured ones (`priority.classes`): 400 naming the field."""
    named = [("priority", f.priority)] if f.priority is not None else []
    named += [(f"priorities[{i}]", p) for i, p in enumerate(f.priorities)]
    for where, name in named:
        if name not in classes:
            raise ProxyError(400, f"{where}: {unknown_class(name, classes)}.", code="invalid_key", param=where)


def create(
    store: GovStore,
    f: KeyFields,
    actor: str,
    parent: str | None = None,
    parent_fp: str | None = None,
    cap: KeyCap | None = None,
) -> tuple[dict[str, Any], str]:
    """Creates a key; returns (stored data, token). The token is not stored. `parent`: the
    managed key that created it, whose budget it spends against too; `parent_fp`: the
    `maker_fingerprint` of the config key that did; `cap`: its team's bound, checked in the write."""
    key_id = "k" + os.urandom(6).hex()
    token, salt, digest = new_secret(key_id)
    now = time.time()
    data = {**f.model_dump(), "id": key_id, "salt": salt, "hash": digest, "created_at": now, "created_by": actor}
    data["parent"] = parent
    if parent_fp is not None:
        data["parent_fp"] = parent_fp
    data["updated_at"] = now
    store.put_key(data, create=True, audit=AuditOf(actor, "key.created", audited), cap=cap)
    return data, token


def _existing(key_id: str, before: dict[str, Any] | None) -> dict[str, Any]:
    """The key a change applies to: 404 when there is none, 409 when it is revoked."""
    if before is None:
        raise ProxyError(404, f"No managed key {key_id}.", code="key_not_found")
    if before.get("revoked_at"):
        raise ProxyError(409, f"Key {key_id} is revoked; create a new key.", code="key_revoked")
    return before


def _audit(actor: str | None, action: str) -> AuditOf | None:
    """The entry a change writes with itself (`actor` None: none, for tools and tests)."""
    return AuditOf(actor, action, audited, changed) if actor is not None else None


def update(
    store: GovStore,
    key_id: str,
    changes: dict[str, Any],
    actor: str | None = None,
    cap: KeyCap | None = None,
    kept: Mapping[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Applies validated changes; returns (before, after), `after is before` when they change
    nothing (nothing written nor audited: `unchanged`). `cap`: the bound of a team it moves to.
    `kept`: keys below it that ended with its expiry, by id, and when (`ManagedKeys.kept_ended`):
    each records that end as its own expiry in the same write, so that the key given a later
    one does not bring them back with it (audited `key.kept_ended`)."""

    def change(before: dict[str, Any] | None) -> dict[str, Any]:
        current = _existing(key_id, before)
        if all(current.get(k) == v for k, v in changes.items()):
            return current
        return {**current, **changes, "updated_at": time.time()}

    also = [(k, _ended_at(when), _audit(actor, "key.kept_ended")) for k, when in (kept or {}).items()]
    before, after = store.change_key(key_id, change, _audit(actor, "key.updated"), cap, also)
    assert before is not None
    return before, after


def _ended_at(when: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A key's change to an expiry of `when` at the latest (none when its own row has ended)."""

    def change(before: dict[str, Any]) -> dict[str, Any]:
        if _ended(before, time.time()) is not None:
            return before
        return {**before, "expires_at": when, "updated_at": time.time()}

    return change


def rotate(
    store: GovStore, key_id: str, grace_s: float, actor: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    token, salt, digest = new_secret(key_id)

    def change(before: dict[str, Any] | None) -> dict[str, Any]:
        before = _existing(key_id, before)
        now = time.time()
        after = {**before, "salt": salt, "hash": digest, "rotated_at": now, "updated_at": now}
        after["prev_salt"], after["prev_hash"] = (before["salt"], before["hash"]) if grace_s > 0 else (None, None)
        after["grace_until"] = now + grace_s if grace_s > 0 else None
        return after

    before, after = store.change_key(key_id, change, _audit(actor, "key.rotated"))
    assert before is not None
    return before, after, token


def revoke(store: GovStore, key_id: str, actor: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Revokes a key; returns (before, after), `after is before` when it was revoked already."""

    def change(before: dict[str, Any] | None) -> dict[str, Any]:
        if before is None:
            raise ProxyError(404, f"No managed key {key_id}.", code="key_not_found")
        if before.get("revoked_at"):
            return before  # revoked already: nothing written
        return {**before, "revoked_at": time.time(), "updated_at": time.time()}

    before, after = store.change_key(key_id, change, _audit(actor, "key.revoked"))
    assert before is not None
    return before, after
