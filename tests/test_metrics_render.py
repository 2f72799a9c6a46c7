"""`/metrics` under many scrapers: one render shared by the scrapes that arrive together, reused
for a bounded window, formatted off the event loop (`edgeroute.metrics_render`)."""

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
    monkeypatch.setattr(metrics_render, "REUSE_MAX_S", 60.0)  # a window no test outlasts
    monkeypatch.setattr(metrics_render, "REUSE_FACTOR", 1e9)
    compressed: list[int] = []
    real_compress = gzip.compress
    monkeypatch.setattr(gzip, "compress", lambda data, *a, **k: compressed.append(1) or real_compress(data, *a, **k))
    got = await asyncio.gather(*(_get(proxy.url) for _ in range(20)))
    assert {status for status, _, _ in got} == {200}
    assert len({body for _, _, body in got}) == 1  # the same exposition for all
    assert metrics.own.made == 1
    zipped = await asyncio.gather(*(_get(proxy.url, "gzip") for _ in range(20)))  # as Prometheus asks
    assert {gzip.decompress(body) for _, _, body in zipped} == {got[0][2]}
    assert metrics.own.made == 1 and len(compressed) == 1  # compressed once for all
    text = got[0][2].decode()
    check_exposition(text)
    assert Scrape(text).value("edgeroute_tokens_total", route="m", deployment="d", team="team-299", kind="prompt") == 10
    # Within the window a scrape is answered by the same render: what happened since is not in it.
    metrics.observe(_record("late-team"))
    _, _, again = await _get(proxy.url)
    assert again == got[0][2] and metrics.own.made == 1


async def test_a_scrape_shows_what_happened_once_its_window_is_over(start_proxy) -> None:
    """The staleness bound: a render is reused for at most `REUSE_MAX_S` (ten times what it
    took, a few ms for a small config), so a scrape soon shows a request that finished."""
    proxy: Proxy = await start_proxy(CFG)
    metrics = proxy.app[METRICS]
    await _get(proxy.url)
    metrics.observe(_record("new-team"))

    async def shown() -> bool:
        _, _, body = await _get(proxy.url)
        return Scrape(body.decode()).value("edgeroute_tokens_total", team="new-team", route="m", deployment="d",
                                           kind="prompt") == 10  # fmt: skip

    await eventually(shown, "the new team's tokens scraped", within=metrics_render.REUSE_MAX_S + 1)


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
    assert gzip.decompress(zipped) == plain
    check_exposition(plain.decode())


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
