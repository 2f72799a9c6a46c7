"""A client's model name with a NUL (JSON "\\u0000") on a PostgreSQL ledger, which refuses NUL
in text: the batch holding the refused request was rejected and written again row by row
(one transaction per record, every other tenant's records of that flush too), and the request
set aside, out of the request log: a cheap way to slow the writer and hide one's probing.
The ledger's rows now carry client text with NUL replaced (U+FFFD)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually, new_pg_schema_dsn, simple_config
from tests.test_cost_support import cost_proxy


async def test_a_nul_in_a_model_name_neither_hides_the_request_nor_splits_the_batch(
    start_upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up}, ledger={"backend": "postgres", "dsn": new_pg_schema_dsn(), "flush_interval": 0.2})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        body = b'{"model":"probe\\u0000model","messages":[{"role":"user","content":"hi"}]}'
        async with s.post(proxy.url + "/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == 404
            probe = r.headers["x-request-id"]
        ids = [probe]
        for _ in range(5):  # other tenants' requests, in the same flush
            async with s.post(proxy.url + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}) as r:  # fmt: skip
                assert r.status == 200
                ids.append(r.headers["x-request-id"])

        async def logged() -> list[dict[str, Any]]:  # by id: the suite's database holds others' rows
            rows = []
            for rid in ids:
                async with s.get(proxy.url + f"/admin/requests/{rid}") as r:
                    if r.status != 200:
                        return []
                    rows.append(await r.json())
            return rows

        with caplog.at_level(logging.WARNING):
            rows = await eventually(logged, "all six requests in the request log", within=10)
    assert rows[0]["status"] == 404 and rows[0]["model"].startswith("probe"), "the refused request is in the log"
    assert "\u0000" not in rows[0]["model"]
    assert not [r for r in caplog.records if "row by row" in r.getMessage() or "set aside" in r.getMessage()]
