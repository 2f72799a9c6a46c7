"""Who a keyed request is to a sticky A/B experiment (`experiment.sticky`).

The core buckets a request by the `user` and `key` it is given, and without a user falls back
to the body's `user`: a client could then try `user` values (on the free `/v1/route/explain`)
until one lands on the arm it wants. So a keyed request is bucketed by its key's identity
alone: the user bound to the key, else the key id, hashed with a per-deployment salt so that
arms cannot be worked out offline (the bound user is given the core twice: as it is, for the
rules that name it, and salted, for the bucket). The salt is `learning.experiment_salt`, else a random one the
governance store makes once (every instance on that store, and a restart, finds the same), else
(a store in memory only) one derived from the config's key secrets. Not derived from the key
set where it can be helped: adding or rotating any key would move every key's arm mid-experiment.
A keyless caller (a sidecar's app) keeps the body's `user`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from typing import TypedDict

from edgeroute import secrets
from edgeroute.config import Config
from edgeroute.cost.keys import Identity

log = logging.getLogger("edgeroute.sticky")
_PREFIX = "\x00sticky:"  # no configured user is this: a `users:` rule condition never matches it
_PROCESS_SALT = os.urandom(32)
_salts: tuple[Config, bytes | None, bytes] | None = None  # the last config generation's


def salt(config: Config, stored: bytes | None = None) -> bytes:
    """`learning.experiment_salt`, else `stored` (the governance store's random salt), else one
    derived from the config's key secrets (which a client does not know, and every instance
    sharing the config has); cached per generation."""
    global _salts
    if _salts is not None and _salts[0] is config and _salts[1] is stored:
        return _salts[2]
    got: bytes | None = None
    if (chosen := config.learning.experiment_salt) is not None:
        try:
            got = secrets.resolve(chosen).reveal().encode()
        except secrets.SecretError as e:  # not a 500 on every keyed request: the derived salt
            log.error("learning.experiment_salt cannot be read (%s): using the stored or derived salt", e)
    if got is None:
        got = stored
    if got is None:
        parts = sorted(secrets.resolve(k).reveal() for k in config.server.api_keys)
        parts += sorted(k.token_sha256 or secrets.resolve(k.token or "").reveal() for k in config.keys.values())
        # No key secret at all: keyed requests come from managed keys in this process's memory
        # alone, so this process's own random salt (not the hash of nothing, a public constant).
        got = hashlib.sha256("\x1f".join(parts).encode()).digest() if parts else _PROCESS_SALT
    _salts = (config, stored, got)
    return got


class Keyed(TypedDict):
    """What the core is given of a keyed caller's identity (`Router.decide`'s arguments)."""

    user: str
    key: str
    sticky: str


def identity(config: Config, stored: bytes | None, ident: Identity) -> Keyed:
    """What to pass the core for a keyed request: as `user`, the key's own user (rules match
    it), else its salted key id (a key without a user matches no `users:` rule either way); as
    `key`, the salted key id; as `sticky`, what a user-sticky experiment buckets it by, the
    salted user (its name alone let anyone work out a user's arm offline), else the salted key id."""
    got = salt(config, stored)
    key = _salted(got, ident.key)
    if ident.user is None:
        return Keyed(user=key, key=key, sticky=key)
    return Keyed(user=ident.user, key=key, sticky=_salted(got, "\x00user:" + ident.user))  # no key id is this


@functools.lru_cache(maxsize=4096)
def _salted(salt: bytes, key: str) -> str:
    """Memoised: an HMAC is ~2 µs, on every keyed request; a key's value changes only with the salt."""
    return _PREFIX + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:32]
