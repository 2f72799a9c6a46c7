"""Signed entries in the shared cache store (Redis).

Anyone who can write to Redis can plant an entry. The read checks catch an entry copied under
another key or with odd fields (`Entry.loads`), but not a forged entry whose fields all agree:
its key, its tenant, a well-formed answer saying whatever its writer wants. With a secret that
every instance has and Redis does not (`cache.signing_key`, else `learning.experiment_salt`),
each stored value carries an HMAC-SHA256 of its Redis name and bytes. A read drops a value that
has no signature or a wrong one. Without such a secret, whoever can write to Redis is trusted
(as with the budgets and rate limits kept there).
"""

from __future__ import annotations

import hashlib
import hmac

from edgeroute import secrets

MAGIC = b"\x00ers1"  # a signed value's start: never a zlib stream's (0x78 ...)
_MAC_BYTES = 32
# The cache's own key from the secret: the same secret used elsewhere (the experiment salt)
# gives a signature nothing else produces.
_PURPOSE = b"edgeroute response cache entry v1"


class EntrySigner:
    """Signs and checks stored values under one secret."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, _PURPOSE, hashlib.sha256).digest()

    def _mac(self, name: str, data: bytes | memoryview) -> bytes:
        h = hmac.new(self._key, name.encode(), hashlib.sha256)
        h.update(b"\n")
        h.update(data)  # (no copy of a large entry)
        return h.digest()

    def sign(self, name: str, data: bytes) -> bytes:
        """The value to store under `name` for the entry's bytes `data`."""
        return MAGIC + self._mac(name, data) + data

    def check(self, name: str, value: bytes) -> bytes | None:
        """The entry's bytes, if `value` was signed for `name` with this secret; else None."""
        start = len(MAGIC) + _MAC_BYTES
        if len(value) <= start or not value.startswith(MAGIC):
            return None
        data = memoryview(value)[start:]
        if not hmac.compare_digest(value[len(MAGIC) : start], self._mac(name, data)):
            return None
        return bytes(data)


def unsigned(value: bytes) -> bytes:
    """An entry's bytes read by an instance that has no secret: a signature, if any, skipped
    (unchecked: such an instance trusts what Redis holds)."""
    start = len(MAGIC) + _MAC_BYTES
    return value[start:] if value.startswith(MAGIC) and len(value) > start else value


def signer(signing_key: str | None, experiment_salt: str | None) -> EntrySigner | None:
    """The signer for the configured secret (a secret reference: env:, file:, exec: or a literal),
    or None when neither is set. A secret that cannot be read is an error at start, not an
    unsigned cache."""
    chosen = signing_key if signing_key is not None else experiment_salt
    if chosen is None:
        return None
    field = "cache.signing_key" if signing_key is not None else "learning.experiment_salt"
    try:
        value = secrets.resolve(chosen).reveal()
    except secrets.SecretError as e:
        raise ValueError(f"{field} cannot be read ({e}): the response cache cannot sign its entries") from None
    return EntrySigner(value.encode())
