"""`/metrics` under many scrapers: one render shared by the scrapes that arrive together, begun
after each of them arrived, paced, and formatted off the event loop (`edgeroute.metrics_render`)."""

from __future__ import annotations

import asyncio
import gzip
import threading
from typing import Any

import pytest
from aiohttp import ClientSession

from edgeroute import metrics as metrics_mod
from edgeroute import metrics_render
from edgeroute.accounting import AttemptRecord, RequestRecord, Usage
from edgeroute.metrics import METRICS
from tests.conftest import Proxy, eventually
from tests.metrics_support import Scrape, check_exposition

CFG = {
    "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k-secret-xx"}},
    "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
    "models": {"m": {"deployments": ["d"]}},
}


def _record(team: str) -> RequestRecord:
    rec = RequestRecord(f"r-{team}", 1.0, "m", route="m", status=200, outcome="ok", team=team)
    rec.attempts.append(AttemptRecord("d", "p", "success", 200, 12.0, usage=Usage(10, 5, 0), kind="first"))
    return rec


async def _get(url: str, encoding: str = "identity") -> tuple[int, dict[str, str], bytes]:
    # auto_decompress off: the bytes as sent, to see what encoding the proxy chose.
    headers = {"Accept-Encoding": encoding}
    async with ClientSession(auto_decompress=False) as s, s.get(url + "/metrics", headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_concurrent_scrapes_share_one_render(start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy: Proxy = await start_proxy(CFG)
    metrics = proxy.app[METRICS]
    for t in range(300):
        metrics.observe(_record(f"team-{t:03d}"))
    compressed: list[int] = []
    real_compress = gzip.compress
    monkeypatch.setattr(gzip, "compress", lambda data, *a, **k: compressed.append(1) or real_compress(data, *a, **k))
    got = await asyncio.gather(*(_get(proxy.url, "gzip") for _ in range(20)))  # as Prometheus asks
    assert {status for status, _, _ in got} == {200}
    # The scrapes that arrived before it began share the first render, those after it the next.
    assert metrics.own.made <= 2 and len(compressed) == metrics.own.made
    texts = {gzip.decompress(body).decode() for _, _, body in got}
    assert len(texts) <= 2
    for text in texts:
        check_exposition(text)
        assert (
            Scrape(text).value("edgeroute_tokens_total", route="m", deployment="d", team="team-299", kind="prompt")
            == 10
        )


async def test_scrapers_looping_on_metrics_get_a_render_a_gap(start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many clients loop on `/metrics`, a render begins only once the gap after the last
    one is over: each looping client waits for it, and they all share that render."""
    proxy: Proxy = await start_proxy(CFG)
    metrics = proxy.app[METRICS]
    monkeypatch.setattr(metrics_render, "GAP_MAX_S", 0.2)
    monkeypatch.setattr(metrics_render, "GAP_FACTOR", 1e9)

    async def loop_on_metrics() -> None:
        for _ in range(4):
            status, _, _ = await _get(proxy.url)
            assert status == 200

    await asyncio.gather(*(loop_on_metrics() for _ in range(10)))
    assert metrics.own.made <= 2 * 4, metrics.own.made  # not one per scrape (40)


async def test_a_scrape_shows_what_happened_before_it_arrived(start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape is answered by a render begun after it arrived: a request that finished
    before it is in it, however recent the previous render."""
    proxy: Proxy = await start_proxy(CFG)
    metrics = proxy.app[METRICS]
    monkeypatch.setattr(metrics_render, "GAP_MAX_S", 0.3)
    monkeypatch.setattr(metrics_render, "GAP_FACTOR", 1e9)
    for team in ("first-team", "second-team"):
        metrics.observe(_record(team))
        _, _, body = await _get(proxy.url)
        value = Scrape(body.decode()).value(
            "edgeroute_tokens_total", team=team, route="m", deployment="d", kind="prompt"
        )
        assert value == 10, team
    assert metrics.own.made == 2


async def test_the_exposition_is_formatted_off_the_event_loop(start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a render is formatted, the proxy answers other requests: formatting thousands of
    series on the loop held every client for as long."""
    proxy: Proxy = await start_proxy(CFG)
    formatting, released = threading.Event(), threading.Event()
    real = metrics_mod.generate_latest
    waited: list[bool] = []

    def slow(registry: Any) -> bytes:
        formatting.set()
        waited.append(released.wait(3))  # False: nobody could release it (the loop was held)
        return real(registry)

    monkeypatch.setattr(metrics_mod, "generate_latest", slow)
    scrape = asyncio.create_task(_get(proxy.url))
    await eventually(lambda: asyncio.sleep(0, formatting.is_set()), "the render formatting", within=5)
    async with ClientSession() as s, s.get(proxy.url + "/healthz") as r:
        assert r.status == 200
    released.set()
    status, _, body = await scrape
    assert status == 200 and b"edgeroute_requests_in_flight" in body
    assert waited == [True], "the loop was held while /metrics was formatted"


async def test_a_scraper_that_accepts_gzip_gets_it(start_proxy) -> None:
    proxy: Proxy = await start_proxy(CFG)
    proxy.app[METRICS].observe(_record("t"))
    status, headers, zipped = await _get(proxy.url, "gzip")
    assert status == 200 and headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, plain = await _get(proxy.url)
    assert "Content-Encoding" not in headers
    for text in (gzip.decompress(zipped).decode(), plain.decode()):  # two renders: the same series
        check_exposition(text)
        assert Scrape(text).value("edgeroute_tokens_total", team="t", route="m", deployment="d", kind="prompt") == 10


async def test_a_scraper_that_goes_away_does_not_cancel_the_others_render(
    start_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy: Proxy = await start_proxy(CFG)
    gate = asyncio.Event()
    metrics = proxy.app[METRICS]
    real = metrics.rendered

    async def held(app: Any) -> bytes:
        await gate.wait()
        return await real(app)

    monkeypatch.setattr(metrics, "rendered", held)
    leaving = asyncio.create_task(_get(proxy.url))
    staying = asyncio.create_task(_get(proxy.url))
    await eventually(lambda: asyncio.sleep(0, metrics.own._making is not None), "a render started", within=5)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    gate.set()
    status, _, body = await staying
    assert status == 200 and b"edgeroute_requests_in_flight" in body
    assert metrics.own.made == 1


async def test_a_workers_own_render_for_a_merge_is_not_paced(start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `serve --workers` each worker paces the scrapes it takes; a sibling's ask for its
    own exposition (`peers`) is answered at once: waiting for its gap as well could outlast the
    merge's `PEER_TIMEOUT_S`, the worker then counted down."""
    proxy: Proxy = await start_proxy(CFG)
    metrics = proxy.app[METRICS]
    monkeypatch.setattr(metrics_render, "GAP_MAX_S", 60.0)
    monkeypatch.setattr(metrics_render, "GAP_FACTOR", 1e9)
    async with asyncio.timeout(10):
        for team in ("first-team", "second-team"):
            metrics.observe(_record(team))
            text = (await metrics.own_body(proxy.app)).decode()
            assert (
                Scrape(text).value("edgeroute_tokens_total", team=team, route="m", deployment="d", kind="prompt") == 10
            )
    assert metrics.own.made == 2
