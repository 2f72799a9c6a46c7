"""An unknown well-formed managed token is looked up again after a fresh read, cheaply.

Two views of one store stand for two instances: a key made or rotated through one is found by
the other after one read (not refused until its next poll). Reads for unknown tokens are shared
(one in flight) and capped (`MISS_READS_PER_S`), a known key reads nothing, and a malformed
token is not looked up at all. The instances themselves: tests/scale/test_keys_made_elsewhere_served_at_once.py.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

from edgeroute.governance import keys as K
from edgeroute.governance.store import GovStore


class _Counting(GovStore):
    """A store that counts the poll's reads of the change counter."""

    def __init__(self, path: Path) -> None:
        super().__init__("sqlite", str(path))
        self.reads = 0

    def keys_seq(self) -> int:
        self.reads += 1
        return super().keys_seq()


def _random_token() -> str:
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    return f"{K.PREFIX}k{os.urandom(6).hex()}.{secret}"


async def test_a_key_made_or_rotated_elsewhere_is_found_after_one_read(tmp_path: Path) -> None:
    elsewhere = GovStore("sqlite", str(tmp_path / "gov.db"))
    here = _Counting(tmp_path / "gov.db")
    view = K.ManagedKeys(here)
    view.load()
    data, token = K.create(elsewhere, K.KeyFields(name="new"), "test")
    assert view.identify(token) is None and view.may_be_new(token)
    ident = await view.identify_after_read(token, time.monotonic())
    assert ident is not None and ident.key == data["id"]

    reads = here.reads
    assert view.identify(token) is not None and here.reads == reads  # a known key reads nothing

    _, _, rotated = K.rotate(elsewhere, data["id"], 0.0)
    assert view.identify(rotated) is None
    assert await view.identify_after_read(rotated, time.monotonic()) is not None
    assert view.identify(token) is None  # the old secret, without grace, is gone with the read


async def test_unknown_tokens_share_reads_and_are_capped(tmp_path: Path) -> None:
    store = _Counting(tmp_path / "gov.db")
    view = K.ManagedKeys(store)
    view.load()
    reads = store.reads
    started = time.monotonic()
    for _ in range(3):  # three bursts of 100 at once
        found = await asyncio.gather(*(view.identify_after_read(_random_token(), time.monotonic()) for _ in range(100)))
        assert found == [None] * 100
    took = time.monotonic() - started
    assert store.reads - reads == view.miss_reads
    assert view.miss_reads <= K.MISS_READS_PER_S * took + 1, (view.miss_reads, took)
    assert took < 3 * K.MISS_WAIT_S + 1, took


def test_a_malformed_token_is_not_looked_up(tmp_path: Path) -> None:
    view = K.ManagedKeys(GovStore("sqlite", str(tmp_path / "gov.db")))
    good = _random_token()
    assert view.may_be_new(good)
    for bad in (good[:-1], good + "x", good.replace(".", "-", 1), "er-kXYZ.abc", "sk-" + good[3:], "er-"):
        assert not view.may_be_new(bad), bad
