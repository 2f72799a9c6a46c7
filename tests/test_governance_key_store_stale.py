"""The managed keys' view and its bound, in one process (the partition itself:
tests/scale/test_keys_when_the_key_store_is_cut_off.py).

A SQLite store is on the machine: its view is never stale, whatever the bound. The poll's
failures are logged once an outage (and when it ends) and counted, and a read that hangs is
not started again at each tick.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from edgeroute.errors import ProxyError
from edgeroute.governance import keys as K
from edgeroute.governance.store import GovStore
from tests.conftest import eventually


def _made(store: GovStore) -> str:
    _, token = K.create(store, K.KeyFields(name="k"), "test")
    return token


def test_a_sqlite_store_is_never_stale() -> None:
    store = GovStore("sqlite", ":memory:")
    token = _made(store)
    keys = K.ManagedKeys(store, stale_after=1.0)
    keys.load()
    keys.last_good -= 3600  # an hour without a read
    assert keys.stale_for() is None
    assert keys.identify(token) is not None


class _Flaky(GovStore):
    """A store whose reads fail, or hang until released, as the test says."""

    def __init__(self) -> None:
        super().__init__("sqlite", ":memory:")
        self.mode = "ok"
        self.released = threading.Event()
        self.reads = 0

    def keys_seq(self) -> int:
        self.reads += 1
        if self.mode == "fail":
            raise OSError("the database is gone")
        if self.mode == "hang":
            self.released.wait(10)
        return super().keys_seq()


async def test_a_failing_or_hung_poll_is_logged_once_counted_and_refuses_past_the_bound(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(K, "POLL_DEADLINE_S", 0.2)
    store = _Flaky()
    token = _made(store)
    keys = K.ManagedKeys(store)
    keys.load()
    keys.stale_after = 0.5  # as a PostgreSQL store's
    caplog.set_level(logging.WARNING, logger="edgeroute.keys")
    poller = asyncio.create_task(keys.follow(0.05))
    try:
        store.mode = "fail"
        await asyncio.sleep(0.8)
        with pytest.raises(ProxyError) as refused:
            keys.identify(token)
        assert refused.value.status == 503 and refused.value.code == "key_store_unavailable"
        assert refused.value.headers["Retry-After"] == str(K.STALE_RETRY_AFTER_S)
        failed = keys.poll_failures
        assert failed >= 5

        store.mode = "hang"  # one read, held: counted once, not started again meanwhile
        await asyncio.sleep(0.3)
        reads = store.reads
        await asyncio.sleep(0.6)
        assert store.reads == reads and keys.poll_failures == failed + 1

        store.mode = "ok"
        store.released.set()

        async def current() -> bool:
            return keys.stale_for() is None

        await eventually(current, "the view current again", within=5)
        assert keys.identify(token) is not None
    finally:
        store.released.set()
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
    said = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the key store (OSError)" in m for m in said) == 1, said
    assert sum("refusing managed keys (503)" in m for m in said) == 1, said
    assert sum("the key store answers again" in m for m in said) == 1, said
