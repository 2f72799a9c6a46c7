"""The bench harness: coordinated-omission-free recording, reports, the mock's wire format, a tiny e2e run."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest

from edgeroute.bench import loadgen, nginx_upstream, report, scenarios, stack
from edgeroute.bench.loadgen import Load, Stats, Target
from edgeroute.bench.upstream import Latency, MockUpstream, UpstreamOptions


async def test_open_loop_counts_a_stall_against_every_request_due_during_it() -> None:
    """A 200 ms stall at 1,000 req/s: ~200 requests were due during it, and each must show the delay
    (a closed-loop or send-time measurement would record a single slow request)."""
    stats = [Stats("fake")]
    stalled = [False]

    async def send(ti: int, intended: float, st: Stats | None) -> None:
        if not stalled[0] and time.perf_counter() - start > 0.1:
            stalled[0] = True
            time.sleep(0.2)  # noqa: ASYNC251  # blocks the loop on purpose, like a GC pause
        assert st is not None
        st.ok += 1
        st.total.record_value(max(1, int((time.perf_counter() - intended) * 1e6)))

    start = time.perf_counter()
    await loadgen.open_loop(send, stats, Load(requests=500, duration=0.5, rate=1000.0, grace=1.0))
    h = stats[0].total
    assert stats[0].sent == stats[0].ok == h.get_total_count() > 400
    assert stats[0].late_sends > 100
    # ~40% of the requests were due during (or queued behind) the stall: p75 must exceed 10 ms.
    assert h.get_value_at_percentile(75) > 10_000
    assert h.get_max_value() >= 150_000


async def test_closed_loop_is_bounded_by_count_and_time() -> None:
    stats = [Stats("a"), Stats("b")]

    async def send(ti: int, intended: float, st: Stats | None) -> None:
        await asyncio.sleep(0.001)
        assert st is not None
        st.ok += 1

    await loadgen.closed_loop(send, stats, Load(requests=30, duration=5.0, rate=None, concurrency=4))
    assert [s.ok for s in stats] == [30, 30]
    stats = [Stats("a")]
    await loadgen.closed_loop(send, stats, Load(requests=10**9, duration=0.2, rate=None, concurrency=2))
    assert 0 < stats[0].ok == stats[0].sent < 10**9  # ended by time, not by count


def test_summary_report_and_plot(tmp_path: object) -> None:
    s = Stats("x")
    for v in range(1, 1001):
        s.total.record_value(v * 10)
    s.ok, s.elapsed_s = 1000, 2.0
    d = s.summary()
    assert d["rps"] == 500.0 and d["latency_ms"] is not None
    assert abs(d["latency_ms"]["p50"] - 5.0) < 0.05 and abs(d["latency_ms"]["p99"] - 9.9) < 0.05
    pts = loadgen.merge_percentiles(s.total)
    assert pts[0][0] == 0.0 and pts[-1][0] >= 99.999
    assert "p99.9" in report.table([s])
    page = tmp_path / "r.html"  # type: ignore[operator]
    report.write_html(page, "t", [s])
    text = page.read_text()
    assert "<svg" in text and "<script" not in text and "http://" not in text.replace("http://www.w3.org", "")


def test_bodies_and_token_detection() -> None:
    body = orjson.loads(loadgen.chat_body("m", 1500, stream=True))
    words = sum(len(m["content"].split()) for m in body["messages"])
    assert 1000 < words < 1300 and body["stream_options"] == {"include_usage": True}
    assert loadgen._has_token(b'data: {"choices":[{"delta":{"content":"Hi"}}]}')
    assert not loadgen._has_token(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert Latency.parse("5") == Latency("fixed", 5.0)
    assert Latency.parse("lognormal:20,1").kind == "lognormal"
    with pytest.raises(ValueError):
        Latency.parse("pareto:1")


async def test_mock_upstream_speaks_openai_to_the_sdk() -> None:
    up = MockUpstream(UpstreamOptions(tokens=5, tokens_per_s=1000, api_key="k"))
    await up.start()
    try:
        client = openai.AsyncOpenAI(base_url=up.url, api_key="k", max_retries=0)
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert r.object == "chat.completion" and r.choices[0].message.content
        assert r.usage is not None and r.usage.completion_tokens == 5
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage
        assert text == r.choices[0].message.content and usage is not None and usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=up.url, api_key="wrong", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        models = await client.models.list()
        assert models.data[0].id == "gpt-4o-mini"
        up.options.error_rate = 1.0
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        up.options.error_rate, up.options.rate_limit_rate = 0.0, 1.0
        async with aiohttp.ClientSession() as s:
            hdrs = {"Authorization": "Bearer k"}
            async with s.post(up.url + "/chat/completions", json={"model": "m", "messages": []}, headers=hdrs) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        await client.close()
    finally:
        await up.stop()


async def test_loadgen_against_the_mock_streaming() -> None:
    up = MockUpstream(UpstreamOptions(tokens=4, tokens_per_s=500))
    await up.start()
    try:
        t = Target("mock", up.url)
        (st,) = await loadgen.run([t], Load(requests=20, duration=2.0, rate=50.0), stream=True, prompt_tokens=50)
        assert st.ok == 20 and st.ttft.get_total_count() == 20 and st.gaps.get_total_count() > 0
        assert st.events >= 20 * 7  # role, 4 tokens, finish, usage (+ [DONE])
    finally:
        await up.stop()


async def test_every_request_has_its_own_prompt_unless_a_cache_bench_repeats_them(start_upstream) -> None:  # type: ignore[no-untyped-def]
    # The proxy remembers what its rules found in prompts seen lately (for cache hits): a bench
    # cycling through a few bodies would measure that memory instead of traffic.
    up = await start_upstream(record=True)
    t = Target("mock", up.base_url, "gpt-4o-mini")
    for distinct, kinds in ((True, 40), (False, 16)):
        up.options.requests.clear()
        load = Load(requests=40, duration=5.0, rate=None, concurrency=4)
        (st,) = await loadgen.run([t], load, prompt_tokens=200, distinct=distinct)
        turns = [r["body"]["messages"][-1]["content"] for r in up.options.requests]
        assert st.ok == len(turns) == 40 + load.warmup
        assert len(set(turns)) == kinds


def test_tiny_end_to_end_overhead_run(tmp_path: object) -> None:
    """Real `edgeroute serve` and a mock subprocess; ~1 s of interleaved direct/proxied load."""
    c = stack.Common(duration=0.8, requests=40, prompt_tokens=200, pin=False, warmup=5,
                         json=str(tmp_path / "o.json"))  # type: ignore[operator]  # fmt: skip
    out = scenarios.overhead(c, [40.0], rules=10)
    res = out["rates"]["40"]
    assert res["direct"]["ok"] == res["proxy"]["ok"] == 32
    assert res["proxy"]["failed"] == 0 and set(res["added_ms"]) >= {"p50", "p99", "p99.9"}
    assert out["startup_s"] > 0
    assert orjson.loads((tmp_path / "o.json").read_bytes())["scenario"] == "overhead"  # type: ignore[operator]


@pytest.mark.skipif(not nginx_upstream.available(), reason="nginx is not installed (Debian: nginx-light)")
def test_the_gate_run_interleaves_the_floor_against_nginx(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    """The gate's set-up, tiny: nginx upstream, the bare pass-through as a third target in
    edgeroute's phase (each answered every request), both added latencies reported."""
    c = stack.Common(duration=0.8, requests=40, prompt_tokens=200, pin=False, warmup=5,
                         json=str(tmp_path / "g.json"))  # type: ignore[operator]  # fmt: skip
    out = scenarios.overhead(c, [40.0], rules=10, floor=True, floor_interleaved=True, budgets=True, upstream="nginx")
    res = out["rates"]["40"]
    assert out["upstream"] == "nginx"
    assert res["direct"]["ok"] == res["proxy"]["ok"] == 32 and res["proxy"]["failed"] == 0
    assert res["floor"]["ok"] == 32 and res["floor_cpu_ms_per_request"] > 0
    assert set(res["floor_added_ms"]) >= {"p50", "p99"}
    table = capsys.readouterr().out.split("latency_ms")[1].splitlines()  # one phase: one table, three targets
    assert [ln.split()[0] for ln in table[3:6]] == ["direct", "edgeroute", "bare"]


def test_bench_config_is_valid_and_cli_parses() -> None:
    from edgeroute import config
    from edgeroute.bench import cli

    cfg = config.parse(stack.bench_config({"p0": "http://127.0.0.1:1/v1"}, rules=50), "bench.yaml")
    assert len(cfg.rules) == 50 and len(cfg.deployments) == 4
    a = cli.build_parser().parse_args(["overhead", "--rates", "500,1000", "--floor", "--no-progress"])
    assert a.rates == "500,1000" and a.floor and not a.progress
    # `--upstream nginx` was read as `--upstream-latency nginx`: the mock failed to start, no reason given.
    a = cli.build_parser().parse_args(["overhead", "--upstream", "nginx", "--workers", "2"])
    assert (a.upstream, a.upstream_latency, a.workers) == ("nginx", "0", 2)
    a = cli.build_parser().parse_args(["chaos", "--total", "100"])
    assert a.total == 100 and a.base_ejection_ms == 2000
