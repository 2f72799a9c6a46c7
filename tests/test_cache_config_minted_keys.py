"""Keys a team's config key mints count as that key's one tenant in the cache's fair shares.

The response cache's bounds and the semantic cache's embedding thread are shared per root key
(the managed key at the top of the chain that made a key), so that a holder minting keys gets
one share. A key made by a config key (`parent: config:<id>`) was its own root: a team's admin
key from the config minted 20 keys and got 20 shares of the embedding thread and of the
model's `max_entries`, pushing another tenant's answers out. Now such keys count under the
config key that made them; keys an operator's global config key makes stay each their own
tenant (`test_cache_tenant_share_redis.py::test_child_keys_of_one_holder_count_as_one_tenant`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute.cache.service import CACHE, EmbeddingQueue
from tests.security.governed import ROOT, call
from tests.test_cache import cached, calls
from tests.test_cache_semantic_tenants import _client
from tests.test_cache_tenant_share import BOUND, _ask, _ask_all

RED_ADMIN = "tok-red-admin-0123456789"


@pytest.mark.parametrize("mode", ["exact", "semantic"])
async def test_keys_a_teams_config_key_mints_share_its_one_share(
    start_upstream: Any, start_proxy: Any, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded_for: list[str] = []  # the tenant each turn was embedded for
    submit = EmbeddingQueue.submit

    def seen(self: EmbeddingQueue, tenant: str, fn: Any, turn: str) -> Any:
        embedded_for.append(tenant)
        return submit(self, tenant, fn, turn)

    monkeypatch.setattr(EmbeddingQueue, "submit", seen)
    up = await start_upstream(record=True)
    cfg = cached({"a": up}, scope="key", max_entries=BOUND, mode=mode) | {
        "keys": {
            "root": {"token": ROOT, "role": "admin"},
            "red-admin": {"token": RED_ADMIN, "role": "admin", "team": "red"},
        },
        "governance": {"managed_keys": True},
        "ledger": {"path": str(tmp_path / "gov.db")},
    }
    proxy = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        _, victim = await call(s, "POST", proxy.url + "/admin/keys", ROOT, {"team": "blue"})
        minted = [(await call(s, "POST", proxy.url + "/admin/keys", RED_ADMIN, {}))[1] for _ in range(20)]
    assert all("secret" in k for k in minted), minted[0]
    mine = ["blue question 1", "blue question 2"]
    clients = [_client(proxy.url, k["secret"]) for k in (victim, *minted)]
    try:
        assert await _ask_all(proxy, clients[0], mine) == ["miss", "miss"]
        embedded_for.clear()
        for i, child in enumerate(clients[1:]):
            assert await _ask_all(proxy, child, [f"red question {i}"]) == ["miss"]
        paid = calls(up)
        for text in mine:
            assert await _ask(clients[0], text) == ("hit", 0.0), "20 minted keys took 20 shares"
        assert calls(up) == paid
        store = proxy.app[CACHE].store
        assert store.size("m", "key:red-admin")[0] == BOUND - len(mine), "the minted keys' answers are one tenant's"
        assert store.size("m", f"key:{victim['id']}")[0] == len(mine)
        if mode == "semantic":
            assert embedded_for and set(embedded_for) == {"key:red-admin"}, set(embedded_for)
    finally:
        for c in clients:
            await c.close()
