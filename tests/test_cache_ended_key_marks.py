"""A request of a managed key in flight when the key ends stores nothing, however long it runs.

What a key's requests then in flight answered was kept from the cache by a mark of the ended key
that lasted 600 s (`ENDED_KEEP_S`), while a request's `timeouts.total` has no bound: a long stream
outlived the mark and stored its answer for the team to be served. The mark now lasts as long as
the key view holds the key ended. Here the fixed mark lapses at once (a request that outlived it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute.cache import service
from tests.security.governed import ROOT, call
from tests.security.test_cache_of_revoked_keys import OTHER, PRIVATE, _ask, _config, _only_if_cached, _revoke_in_flight


async def test_an_answer_that_outlives_the_ended_keys_mark_is_not_stored(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "ENDED_KEEP_S", 0.0)
    up = await start_upstream()
    proxy = await start_proxy(_config(up, tmp_path, scope="team"))
    async with aiohttp.ClientSession() as s:
        status, gone = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"name": "leaving", "team": "research"})
        assert status == 201
        status, stays = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"name": "staying", "team": "research"})
        assert status == 201
    assert await _ask(proxy.url, gone["secret"], OTHER) == "miss"
    assert await _only_if_cached(proxy.url, stays["secret"], OTHER) == 200  # the premise: the team shares
    await _revoke_in_flight(up, proxy.url, proxy.url, gone)
    assert await _only_if_cached(proxy.url, stays["secret"], PRIVATE) == 504, "stored after the revocation"
