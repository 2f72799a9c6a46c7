"""The request log's read API under hostile values, on SQLite and PostgreSQL alike: every
value is a 200 or a 400 naming its parameter, never a 500 (an error the operator's console
shows as "Internal error", and a traceback in the proxy's log for each call).

- A NUL byte (`%00`) in a filter, a cursor or a request id: PostgreSQL refuses NUL in text
  (psycopg's DataError, a 500), SQLite compares it as any other character.
- A bucket past 64 bits: the answer's `t` and `bucket` could not be encoded (a 500).
- A `limit` or `bucket` of more than 4,300 digits: Python's `int` refuses it (a 500).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import eventually, new_pg_schema_dsn, simple_config
from tests.test_cost_support import cost_proxy


def _cursor(ts: float, rid: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts, rid])).decode().rstrip("=")


def _ledger(backend: str, tmp_path: Path) -> dict[str, Any]:
    if backend == "postgres":
        return {"backend": "postgres", "dsn": new_pg_schema_dsn(), "flush_interval": 0.05}
    return {"path": str(tmp_path / "log.db"), "flush_interval": 0.05}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_hostile_request_log_queries_are_a_400_on_every_backend(
    start_upstream: Any, tmp_path: Path, backend: str
) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up}, ledger=_ledger(backend, tmp_path))
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()

        async def logged() -> list[dict[str, Any]]:
            async with s.get(proxy.url + "/admin/requests?since=1h") as r:
                return list((await r.json())["data"])

        rid = (await eventually(logged, "the request in the log"))[0]["id"]
        for path, param in (
            ("/admin/requests?model=a%00b", "model"),
            ("/admin/requests?key=%00", "key"),
            ("/admin/requests?team=t%00", "team"),
            ("/admin/requests?deployment=%00", "deployment"),
            ("/admin/requests?error_class=%00", "error_class"),
            ("/admin/requests?rule=%00", "rule"),
            (f"/admin/requests?cursor={_cursor(1e10, 'a' + chr(0))}", "cursor"),
            ("/admin/stats?bucket=6000000000000000000000000000", "bucket"),
            ("/admin/stats?bucket=18446744073709551616", "bucket"),
            # Past 4,300 digits Python's `int` refuses a number (ValueError): a 500.
            ("/admin/requests?limit=" + "9" * 5000, "limit"),
            ("/admin/stats?bucket=" + "6" * 5000 + "0", "bucket"),
        ):
            async with s.get(proxy.url + path) as r:
                body = await r.json()
                assert (r.status, body["error"]["param"]) == (400, param), (path, body)
        async with s.get(proxy.url + "/admin/requests/" + rid + "%00") as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["error"]["param"] == "id"
        # What these values guard did not stop ordinary reads.
        async with s.get(proxy.url + "/admin/requests/" + rid) as r:
            assert r.status == 200 and (await r.json())["id"] == rid
        async with s.get(proxy.url + "/admin/stats?since=1h&bucket=3600") as r:
            assert r.status == 200 and (await r.json())["totals"]["requests"] >= 1


async def test_new_model_names_do_not_grow_the_stats(start_upstream: Any, tmp_path: Path) -> None:
    """A client naming a new model with each refused request: the request log keeps each name,
    the stats count them under one value (they grew by ~2.3 KB of rollup rows per name)."""
    up = await start_upstream()
    cfg = simple_config({"a": up}, ledger={"path": str(tmp_path / "log.db"), "flush_interval": 0.1})
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        for i in range(40):
            body = {"model": f"made-up-{i}", "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 404

        async def by_model() -> list[dict[str, Any]]:
            async with s.get(proxy.url + "/admin/stats?group_by=model&since=1h") as r:
                rows = [row for row in (await r.json())["rows"] if row["requests"]]
                return rows if sum(row["requests"] for row in rows) >= 40 else []

        rows = await eventually(by_model, "40 refused requests in the stats")
        assert [(row["group"], row["requests"], row["errors"]) for row in rows] == [("(unrouted)", 40, 40)]
        async with s.get(proxy.url + "/admin/requests?limit=50&model=made-up-7") as r:
            assert [d["model"] for d in (await r.json())["data"]] == ["made-up-7"]
