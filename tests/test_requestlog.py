"""The request log end to end: records written by the ledger's writer, the query API (filters,
pages, detail, stats on data with known answers), roles, bad input, retention, idempotence."""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.cost.ledger import Ledger
from edgeroute.cost.ledger_store import PostgresBackend, SqliteBackend
from edgeroute.requestlog import query, rollup, store
from edgeroute.requestlog.settings import RequestLog
from tests.test_cost_ledger import _poison, _record
from tests.test_cost_support import cost_proxy
from tests.test_requestlog_rollups import _open


def _two_upstream_config(good: str, bad: str, db: Path, **extra: Any) -> dict[str, Any]:
    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    cfg: dict[str, Any] = {
        "providers": {"good": {"base_url": good, "api_key": "sk-good-secret"}, "bad": {"base_url": bad}},
        "deployments": {
            "d-good": {"provider": "good", "model": "gpt-4o-mini", "price": price},
            "d-bad": {"provider": "bad", "model": "gpt-4o-mini", "price": price},
        },
        "models": {"m": {"deployments": ["d-good"]}, "flaky": {"deployments": ["d-bad"], "fallbacks": ["m"]}},
        "ledger": {"path": str(db), "flush_interval": 0.05},
    }
    cfg.update(extra)
    return cfg


async def _get(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict[str, Any]]:
    async with s.get(url, headers=headers) as r:
        return r.status, await r.json()


async def _wait_for(s: aiohttp.ClientSession, url: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        status, body = await _get(s, url)
        assert status == 200, body
        if len(body["data"]) >= n or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


async def test_requests_are_logged_and_queried_end_to_end(start_upstream: Any, tmp_path: Path) -> None:
    good = await start_upstream(reply_words=5)
    bad = await start_upstream(fail_status=503)
    cfg = _two_upstream_config(good.base_url, bad.base_url, tmp_path / "log.db")
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        for i in range(3):
            await client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": f"hello {i}"}],
                extra_headers={"x-edgeroute-tags": "a,b"},
            )
        await client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hi"}])
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "stream"}], stream=True
        )
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

        page = await _wait_for(s, proxy.url + "/admin/requests", 6)
        data = page["data"]
        assert len(data) == 6 and page["next_cursor"] is None
        assert [d["ts"] for d in data] == sorted((d["ts"] for d in data), reverse=True)
        assert data[0]["model"] == "nope" and data[0]["status"] == 404 and data[0]["error_class"]
        flaky = next(d for d in data if d["model"] == "flaky")
        assert flaky["attempts"] == 2 and flaky["deployment"] == "d-good" and flaky["status"] == 200
        assert all(d["cost_usd"] > 0 for d in data if d["status"] == 200)

        # Filters, each on its own.
        _, only_m = await _get(s, proxy.url + "/admin/requests?model=m")
        assert len(only_m["data"]) == 4
        _, errors = await _get(s, proxy.url + "/admin/requests?status=4xx")
        assert [d["model"] for d in errors["data"]] == ["nope"]
        _, by_dep = await _get(s, proxy.url + "/admin/requests?deployment=d-good&since=1h")
        assert len(by_dep["data"]) == 5
        _, none = await _get(s, proxy.url + "/admin/requests?min_cost_usd=1000")
        assert none["data"] == []

        # Pages of two, through the cursor, give every record once, in order.
        seen: list[str] = []
        url = proxy.url + "/admin/requests?limit=2"
        while True:
            _, p = await _get(s, url)
            seen += [d["id"] for d in p["data"]]
            if p["next_cursor"] is None:
                break
            url = proxy.url + f"/admin/requests?limit=2&cursor={p['next_cursor']}"
        assert seen == [d["id"] for d in data]

        # One request: the explanation and the attempts timeline.
        status, one = await _get(s, proxy.url + f"/admin/requests/{flaky['id']}")
        assert status == 200
        assert [a["deployment"] for a in one["attempts"]] == ["d-bad", "d-good"]
        assert one["attempts"][0]["outcome"] != "success" and one["attempts"][1]["kind"] == "fallback"
        assert one["attempts"][0]["status"] == 503 and one["content"] is None and one["reasons"]
        tagged = next(d for d in data if d["model"] == "m" and not d["stream"])
        _, t = await _get(s, proxy.url + f"/admin/requests/{tagged['id']}")
        assert t["tags"] == ["a", "b"]
        assert (t["priority"], t["queue_ms"]) == ("default", 0.0)  # the class it was served in, and its wait
        status, _ = await _get(s, proxy.url + "/admin/requests/no-such-id")
        assert status == 404

        # Stats: per deployment counts attempts (the failed one included), per model requests.
        _, by_model = await _get(s, proxy.url + "/admin/stats?group_by=model&since=1h")
        counts = {r["group"]: (r["requests"], r["errors"]) for r in by_model["rows"]}
        assert counts == {"m": (4, 0), "flaky": (1, 0), "(unrouted)": (1, 1)}  # no route serves "nope"
        assert by_model["totals"]["requests"] == 6
        _, by_dep_stats = await _get(s, proxy.url + "/admin/stats?group_by=deployment&since=1h&bucket=60")
        deps = {r["group"]: (r["requests"], r["errors"]) for r in by_dep_stats["rows"] if r["requests"]}
        assert deps == {"d-good": (5, 0), "d-bad": (1, 1)}
        assert all(r["t"] % 60 == 0 for r in by_dep_stats["rows"])

    # No credential ever lands in the database.
    raw = (tmp_path / "log.db").read_bytes()
    assert b"sk-good-secret" not in raw


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/requests?modle=m", "modle"),
        ("/admin/requests?limit=501", "limit"),
        ("/admin/requests?limit=0", "limit"),
        ("/admin/requests?since=yesterday", "since"),
        ("/admin/requests?since=1h&until=2h", "since"),
        ("/admin/requests?status=teapot", "status"),
        ("/admin/requests?cursor=garbage", "cursor"),
        ("/admin/requests?min_latency_ms=-1", "min_latency_ms"),
        ("/admin/stats?group_by=colour", "group_by"),
        ("/admin/stats?bucket=90", "bucket"),
        ("/admin/stats?bucket=60&since=3000d", "bucket"),
        ("/admin/stats?until=nan", "until"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    start_upstream: Any, tmp_path: Path, path: str, param: str
) -> None:
    up = await start_upstream()
    cfg = _two_upstream_config(up.base_url, up.base_url, tmp_path / "log.db")
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        status, body = await _get(s, proxy.url + path)
    assert status == 400, body
    assert body["error"]["param"] == param and param in body["error"]["message"]


async def test_viewer_reads_the_log_and_service_keys_cannot(start_upstream: Any, tmp_path: Path) -> None:
    up = await start_upstream()
    keys = {
        "ops": {"token": "tok-viewer-123456", "role": "viewer"},
        "app": {"token": "tok-service-123456"},
    }
    cfg = _two_upstream_config(up.base_url, up.base_url, tmp_path / "log.db", keys=keys)
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-service-123456", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        viewer = {"Authorization": "Bearer tok-viewer-123456"}
        deadline = time.monotonic() + 10
        while True:
            status, page = await _get(s, proxy.url + "/admin/requests", **viewer)
            assert status == 200
            if page["data"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert page["data"][0]["key"] == "app"
        status, _ = await _get(s, proxy.url + "/admin/stats", **viewer)
        assert status == 200
        for path in ("/admin/requests", "/admin/stats", f"/admin/requests/{page['data'][0]['id']}"):
            status, body = await _get(s, proxy.url + path, Authorization="Bearer tok-service-123456")
            assert status == 403, body


# -- stats on data with known answers -------------------------------------------------------


def _synthetic(n: int, t0: float, rng: random.Random) -> list[RequestRecord]:
    out = []
    for i in range(n):
        model = ("alpha", "beta", "gamma")[i % 3]
        lat = rng.lognormvariate(5, 1)  # ~150 ms median, a long tail
        ok = rng.random() > 0.1
        usage = Usage(rng.randint(1, 500), rng.randint(1, 300))
        dep = f"dep-{model}"
        ttft = lat / 3
        rec = RequestRecord(
            request_id=f"syn-{i}", started=t0 + i * (3600 / n), model=model, route=model,
            team=("red", "blue")[i % 2], key=f"k{i % 5}", status=200 if ok else 502,
            outcome="ok" if ok else "error", latency_ms=lat, deployment=dep if ok else None,
            usage=usage if ok else None, cost_usd=usage.completion_tokens * 1e-6 if ok else 0.0,
            attempts=[AttemptRecord(dep, "prov", "success" if ok else "server_error", 200 if ok else 502, lat,
                                    usage=usage if ok else None, cost_usd=usage.completion_tokens * 1e-6 if ok else 0)],
        )  # fmt: skip
        rec.ttft_ms = ttft
        out.append(rec)
    return out


def _nearest_rank(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(1, math.ceil(q * len(s))) - 1]


def _close(estimate: float | None, exact: float) -> bool:
    assert estimate is not None
    return abs(estimate - exact) <= exact * rollup.MAX_RELATIVE_ERROR + 1e-9


def test_bucket_edges_and_percentile_error_bound() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        v = rng.lognormvariate(4, 2.5)
        if v < rollup.LOWEST_MS or v > 4e5:
            continue
        assert _close(rollup.bucket_value(rollup.bucket(v)), v), v
    assert rollup.bucket(0) == 0 and rollup.bucket(float("nan")) == 0 and rollup.bucket(1e12) == rollup.BUCKETS - 1


def test_the_bisected_bucket_is_the_logarithms_to_the_float() -> None:
    """`bucket` bisects precomputed starts (the writer's rollups, two or three times a record):
    each duration lands where the logarithm puts it, at every bucket's edge too."""
    rng = random.Random(3)
    values = [rng.lognormvariate(3, 3) for _ in range(50_000)] + [-1.0, 0.0, float("nan"), float("-inf")]
    for start in rollup._STARTS:
        values += [start, math.nextafter(start, 0.0), math.nextafter(start, math.inf)]
    assert [rollup.bucket(v) for v in values] == [rollup.bucket_by_log(v) for v in values]


def test_stats_match_known_answers(tmp_path: Path) -> None:
    ledger = Ledger(SqliteBackend(tmp_path / "s.db"), flush_interval=0.05, request_log=RequestLog())
    t0 = (time.time() // 3600 - 5) * 3600  # a whole hour, five hours ago
    recs = _synthetic(6000, t0, random.Random(1))
    # Written in uneven batches, as traffic arrives: the upserts must add up.
    for i, r in enumerate(recs):
        ledger.record(r)
        if i % 997 == 0:
            ledger.flush()
    ledger.close()
    db = SqliteBackend(tmp_path / "s.db")
    q = {"since": str(t0), "until": str(t0 + 3600)}
    fields: dict[str, Callable[[RequestRecord], str | None]] = {
        "model": lambda r: r.model,
        "team": lambda r: r.team,
        "key": lambda r: r.key,
    }
    for group, key in fields.items():
        got = query.stats(db, {**q, "group_by": group})
        assert {r["group"] for r in got["rows"]} == {key(r) for r in recs}
        for row in got["rows"]:
            mine = [r for r in recs if key(r) == row["group"]]
            lats = [r.latency_ms for r in mine]
            assert row["requests"] == len(mine)
            assert row["errors"] == sum(r.status != 200 for r in mine)
            assert row["success_rate"] == round(1 - row["errors"] / len(mine), 6)
            assert row["prompt_tokens"] == sum(r.usage.prompt_tokens for r in mine if r.usage)
            assert row["completion_tokens"] == sum(r.usage.completion_tokens for r in mine if r.usage)
            assert row["cost_usd"] == pytest.approx(sum(r.cost_usd for r in mine), abs=1e-7)
            for name, qq in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
                assert _close(row[name], _nearest_rank(lats, qq)), (group, name)
            assert _close(row["ttft_p95_ms"], _nearest_rank([x / 3 for x in lats], 0.95))
    # Per deployment: attempts; totals over everything; buckets partition the hour.
    by_dep = query.stats(db, {**q, "group_by": "deployment"})
    assert by_dep["totals"]["requests"] == len(recs)
    buckets = query.stats(db, {**q, "bucket": "600"})
    assert [r["t"] for r in buckets["rows"]] == [int(t0) + 600 * i for i in range(6)]
    assert sum(r["requests"] for r in buckets["rows"]) == len(recs) == buckets["totals"]["requests"]
    assert _close(buckets["totals"]["p99_ms"], _nearest_rank([r.latency_ms for r in recs], 0.99))
    # Windows with ragged ends (hourly rows inside, minute rows at the edges) and inside one hour.
    for since, until in ((t0 - 1800, t0 + 5400), (t0 + 900, t0 + 2700), (t0 + 1230, t0 + 3600)):
        got = query.stats(db, {"since": str(since), "until": str(until)})
        lo, hi = since // 60 * 60, math.ceil(until / 60) * 60  # stats have one-minute resolution
        mine = [r for r in recs if lo <= r.started < hi]
        assert got["totals"]["requests"] == len(mine), (since - t0, until - t0)
        assert got["totals"]["cost_usd"] == pytest.approx(sum(r.cost_usd for r in mine), abs=1e-7)
    # Outside the window: nothing.
    empty = query.stats(db, {"since": str(t0 - 7200), "until": str(t0 - 3600)})
    assert empty["rows"] == [] and empty["totals"]["requests"] == 0 and empty["totals"]["p50_ms"] is None
    db.close()


# -- retention, size cap, idempotence ----------------------------------------------------------


def test_retention_days_and_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    ledger = Ledger(SqliteBackend(path), flush_interval=60, request_log=RequestLog(retention_days=1, max_db_mb=None))
    now = time.time()
    recs = _synthetic(2000, now - 3 * 86400, random.Random(2))  # an hour's worth, three days ago
    recs += _synthetic(2000, now - 3600, random.Random(3))
    for i, r in enumerate(recs):
        r.request_id = f"r-{i}"
        ledger.record(r)
    ledger.flush()
    ledger.maintain(now)
    conn: Any = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 2000
    assert conn.execute("SELECT MIN(ts) FROM requests").fetchone()[0] >= now - 86400
    assert conn.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == 4000  # money is never pruned
    # A cap below the current size drops the oldest request rows until it fits.
    backend = SqliteBackend(path)
    cap = store.used_bytes(backend) - 400_000
    ledger.request_log = RequestLog(retention_days=30, max_db_mb=cap / 1024 / 1024)
    ledger.maintain(now)
    assert store.used_bytes(backend) <= cap
    left = conn.execute("SELECT COUNT(*), MIN(ts) FROM requests").fetchone()
    assert left is not None and 0 < left[0] < 2000
    newest = sorted(r.started for r in recs)[-int(left[0]) :]
    assert left[1] == pytest.approx(newest[0])
    conn.close()
    backend.close()
    ledger.close()


def test_retention_deletes_a_little_at_a_time_with_a_rest_between(tmp_path: Path) -> None:
    """The writer prunes after each batch: in deletes of at most 128 rows, each followed by a
    rest of the writer's (`cost.writer_breath`), never one long delete of a whole budget."""
    path = tmp_path / "p.db"
    backend = SqliteBackend(path)
    ledger = Ledger(backend, flush_interval=60, request_log=RequestLog())
    for i, r in enumerate(_synthetic(500, time.time() - 3 * 86400, random.Random(5))):
        r.request_id = f"p-{i}"
        ledger.record(r)
    ledger.flush()
    rests: list[int] = []
    conn: Any = sqlite3.connect(path)

    def rest() -> None:
        rests.append(_rows(conn, "requests"))

    assert store.prune_some(backend, RequestLog(retention_days=1), 450, rest=rest) == 450
    assert rests == [500 - 128, 500 - 256, 500 - 384, 50]
    conn.close()
    ledger.close()


def _rows(conn: Any, table: str) -> int:
    return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_a_batch_written_twice_is_written_once(tmp_path: Path) -> None:
    """As when PostgreSQL commits but the acknowledgement is lost: the retry adds nothing."""
    path = tmp_path / "i.db"
    backend = SqliteBackend(path)
    ledger = Ledger(backend, flush_interval=60, request_log=RequestLog())
    recs = _synthetic(50, time.time() - 60, random.Random(4))
    held = [ledger._rows(r, f"w-{i}") for i, r in enumerate(recs)]
    from edgeroute.cost.ledger import _Held

    batch = _Held("batch-1", held, []).batch(True)
    backend.write(batch)
    backend.write(batch)
    conn = sqlite3.connect(path)
    assert (_rows(conn, "spend"), _rows(conn, "requests")) == (50, 50)
    assert conn.execute("SELECT SUM(requests) FROM request_rollups WHERE dim = 'none' AND res = 1").fetchone()[0] == 50
    conn.close()
    ledger.close()


class _AckLostOnce:
    """A real backend whose commit of the batch `lose` is made but not acknowledged (as when
    PostgreSQL's connection drops during COMMIT): the write raises after it landed, once."""

    def __init__(self, inner: Any, lose: str) -> None:
        self.inner = inner
        self.lose: str | None = lose

    def write(self, batch: Any, rest: Callable[[], None] = lambda: None) -> None:
        self.inner.write(batch, rest)
        if self.lose is not None and batch.batch_id.endswith(self.lose):
            self.lose = None
            raise ConnectionResetError("the connection closed before the commit was acknowledged")

    def __getattr__(self, name: str) -> Any:  # dialect, rollup_levels, spread, query...
        return getattr(self.inner, name)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_row_written_alone_whose_acknowledgement_is_lost_is_counted_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A batch the store rejects (one bad record) is written row by row; when a row's commit
    lands but its acknowledgement is lost, the retry recognises it: the stats count each
    request once (they counted it twice: the rest of the batch was kept under a new id)."""
    inner, dsn = _open(backend, tmp_path, request)
    db = _AckLostOnce(inner, "/0")  # the first row written alone
    ledger = Ledger(db, flush_interval=60, request_log=RequestLog())  # type: ignore[arg-type]
    t = time.time()
    for i in range(3):
        ledger.record(_record(i))
    ledger.record(_poison("poison"))
    ledger.flush()
    ledger.close()
    assert (ledger.written, ledger.set_aside, ledger.lost_at_close) == (3, 1, 0)
    reader = SqliteBackend(tmp_path / "s.db") if backend == "sqlite" else PostgresBackend(dsn)
    got = query.stats(reader, {"since": str(t - 3600), "until": str(t + 3600)})
    assert reader.query("SELECT COUNT(*) FROM spend", []) == [(3,)]
    assert got["totals"]["requests"] == 3
    reader.close()


def test_postgres_request_log_idempotent_writes_and_stats(pg_schema_dsn: str) -> None:
    dsn = pg_schema_dsn
    ledger = Ledger(PostgresBackend(dsn), flush_interval=60, request_log=RequestLog())
    t0 = (time.time() // 3600 - 2) * 3600
    recs = _synthetic(900, t0, random.Random(5))
    for r in recs:
        ledger.record(r)
    ledger.flush()
    from edgeroute.cost.ledger import _Held

    # Ten more records (new ids) in one batch, sent twice: the retry of a committed batch adds nothing.
    extra = _synthetic(10, t0, random.Random(6))
    for i, r in enumerate(extra):
        r.request_id = f"extra-{i}"
    again = _Held("pg-batch", [ledger._rows(r, f"pg-{i}") for i, r in enumerate(extra)], [])
    ledger.backend.write(again.batch(True))
    ledger.backend.write(again.batch(True))
    ledger.close()
    db = PostgresBackend(dsn)
    got = query.stats(db, {"since": str(t0), "until": str(t0 + 3600), "group_by": "model"})
    assert got["totals"]["requests"] == 910 and sum(r["requests"] for r in got["rows"]) == 910
    page = query.list_requests(db, {"since": str(t0), "until": str(t0 + 3600), "limit": "500"})
    assert len(page["data"]) == 500 and page["next_cursor"]
    assert db.query("SELECT COUNT(*) FROM spend", []) == [(910,)]
    assert db.query("SELECT COUNT(*) FROM spend WHERE row_id LIKE ?", ["pg-%"]) == [(10,)]
    db.close()


async def test_content_is_stored_only_where_configured_and_only_shown_to_admins(
    start_upstream: Any, tmp_path: Path
) -> None:
    up = await start_upstream(reply_words=6)
    keys = {
        "admin": {"token": "tok-admin-123456", "role": "admin"},
        "viewer": {"token": "tok-viewer-123456", "role": "viewer"},
        "app": {"token": "tok-app-123456"},
        "auditor": {"token": "tok-auditor-123456"},
    }
    models = {
        "m": {"deployments": ["d-good"]},
        "private": {"deployments": ["d-good"]},
        "flaky": {"deployments": ["d-bad"], "fallbacks": ["m"]},
    }
    log = {"content_models": {"m": "redacted"}, "content_keys": {"auditor": "full"}}
    cfg = _two_upstream_config(up.base_url, up.base_url, tmp_path / "log.db", keys=keys, request_log=log)
    cfg["models"] = models
    cfg["deployments"]["d-good"]["model"] = "gpt-4o-mini"
    secret = "sk-proj-" + "Z" * 40
    prompt = f"mail bob@example.com, card 4111 1111 1111 1111, my key {secret}"
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        app = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-app-123456", max_retries=0)
        auditor = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="tok-auditor-123456", max_retries=0)
        msgs = [{"role": "user", "content": prompt}]
        await app.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
        stream = await app.chat.completions.create(model="m", messages=msgs, stream=True)  # type: ignore[arg-type]
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await app.chat.completions.create(model="private", messages=msgs)  # type: ignore[arg-type]
        await auditor.chat.completions.create(model="private", messages=msgs)  # type: ignore[arg-type]
        admin = {"Authorization": "Bearer tok-admin-123456"}
        deadline = time.monotonic() + 10
        while True:
            _, page = await _get(s, proxy.url + "/admin/requests", **admin)
            if len(page["data"]) >= 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        newest_first = page["data"]
        details = []
        for d in reversed(newest_first):
            status, one = await _get(s, proxy.url + f"/admin/requests/{d['id']}", **admin)
            assert status == 200
            details.append(one)
        redacted, redacted_stream, private, full = details
        for one in (redacted, redacted_stream):
            c = one["content"]
            assert c["mode"] == "redacted"
            assert "[PII:email]" in c["request"] and "[PII:payment_card]" in c["request"]
            assert "bob@example.com" not in c["request"] and secret not in c["request"]
        # The answers too (the mock echoes the prompt): the JSON answer, or a stream's text once complete.
        assert streamed.startswith("Hello") and "bob@example.com" in streamed
        assert '"chat.completion"' in redacted["content"]["response"]
        assert redacted_stream["content"]["response"].startswith(streamed.split("bob@")[0])
        for one in (redacted, redacted_stream):
            assert "[PII:email]" in one["content"]["response"] and "bob@" not in one["content"]["response"]
        assert private["content"] is None  # private by default
        assert "bob@example.com" in full["content"]["request"] and secret not in full["content"]["request"]
        assert full["content"]["response"]
        # A viewer sees that content exists, never the content.
        status, seen = await _get(
            s, proxy.url + f"/admin/requests/{full['id']}", Authorization="Bearer tok-viewer-123456"
        )
        assert status == 200 and seen["content"] is None and seen["content_withheld"] is True
        await app.close()
        await auditor.close()
    raw = (tmp_path / "log.db").read_bytes()
    assert secret.encode() not in raw and b"tok-app-123456" not in raw


async def test_tags_are_recorded_on_every_endpoint(start_upstream: Any, tmp_path: Path) -> None:
    """`x-edgeroute-tags` reached the record of chat completions only; a legacy completion or
    an embedding tagged for a cost centre was logged without them."""
    good = await start_upstream()
    cfg = _two_upstream_config(good.base_url, good.base_url, tmp_path / "log.db")
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        tags = {"x-edgeroute-tags": "team-x,batch"}
        await client.completions.create(model="m", prompt="say hi", extra_headers=tags)
        await client.embeddings.create(model="m", input="hello", extra_headers=tags)
        page = await _wait_for(s, proxy.url + "/admin/requests", 2)
        assert len(page["data"]) == 2
        for rec in page["data"]:
            _, one = await _get(s, proxy.url + f"/admin/requests/{rec['id']}")
            assert one["tags"] == ["team-x", "batch"], one
