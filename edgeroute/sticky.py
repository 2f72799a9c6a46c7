"""Who a keyed request is to a sticky A/B experiment (`experiment.sticky`).

The core buckets a request by the `user` and `key` it is given, and without a user falls back
to the body's `user`: a client could then try `user` values (on the free `/v1/route/explain`)
until one lands on the arm it wants. So a keyed request is bucketed by its key's identity
alone: the user bound to the key, else the key id, hashed with a per-deployment salt
(`learning.experiment_salt`) so that arms cannot be worked out offline. A keyless caller (a
sidecar's app) keeps the body's `user`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging

from edgeroute import secrets
from edgeroute.config import Config
from edgeroute.cost.keys import Identity

log = logging.getLogger("edgeroute.sticky")
_PREFIX = "\x00sticky:"  # no configured user is this: a `users:` rule condition never matches it
_salts: tuple[Config, bytes] | None = None  # the last config generation's


def salt(config: Config) -> bytes:
    """`learning.experiment_salt`, else one derived from the config's key secrets (which a
    client does not know, and every instance sharing the config has); cached per generation."""
    global _salts
    if _salts is not None and _salts[0] is config:
        return _salts[1]
    got: bytes | None = None
    if (chosen := config.learning.experiment_salt) is not None:
        try:
            got = secrets.resolve(chosen).reveal().encode()
        except secrets.SecretError as e:  # not a 500 on every keyed request: the derived salt
            log.error("learning.experiment_salt cannot be read (%s): using the salt derived from the keys", e)
    if got is None:
        parts = sorted(secrets.resolve(k).reveal() for k in config.server.api_keys)
        parts += sorted(k.token_sha256 or secrets.resolve(k.token or "").reveal() for k in config.keys.values())
        got = hashlib.sha256("\x1f".join(parts).encode()).digest()
    _salts = (config, got)
    return got


def identity(config: Config, ident: Identity) -> tuple[str, str]:
    """(user, key) to pass the core for a keyed request: the key's own user (rules match it),
    else its salted key id in the user's place (a key without a user matches no `users:` rule
    either way), and the salted key id."""
    key = _salted(salt(config), ident.key)
    return (ident.user if ident.user is not None else key), key


@functools.lru_cache(maxsize=4096)
def _salted(salt: bytes, key: str) -> str:
    """Memoised: an HMAC is ~2 µs, on every keyed request; a key's value changes only with the salt."""
    return _PREFIX + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:32]
