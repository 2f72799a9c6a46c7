"""`bench throughput --generator wrk`: wrk's summary read right, and a real run against a mock."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from edgeroute.bench import loadgen, scenarios, wrk

SAMPLE = """Running 2s test @ http://127.0.0.1:4000/v1/chat/completions
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  310.00us   5.00ms   80.00%
    Req/Sec     6.61k   400.00     7.00k    70.00%
  13210 requests in 2.00s, 9.10MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   6605.00
Transfer/sec:      4.55MB
"""


def test_the_summary_is_read() -> None:
    r = wrk.parse(SAMPLE, 0.5)
    assert (r.requests, r.non_2xx, r.errors, r.elapsed_s, r.cpu_s) == (13210, 7, 3, 2.0, 0.5)
    assert r.rps == pytest.approx(6605)
    assert wrk.parse(SAMPLE.replace("in 2.00s", "in 500.00ms"), 0).elapsed_s == 0.5
    assert wrk.parse(SAMPLE.replace("in 2.00s", "in 1.00m"), 0).elapsed_s == 60  # a run of a minute or more
    with pytest.raises(RuntimeError):
        wrk.parse("wrk: unknown option", 0)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/start-services installs it)")
async def test_wrk_drives_a_real_server(start_upstream) -> None:  # type: ignore[no-untyped-def]
    up = await start_upstream(record=True)
    body = loadgen.chat_body("gpt-4o-mini", 32)
    res = await asyncio.to_thread(wrk.run, up.base_url + "/chat/completions", body, 1, 4)
    assert res.requests > 0 and res.non_2xx == 0 and res.errors == 0
    assert len(up.options.requests) >= res.requests  # every answer counted was a chat request
    assert res.cpu_s > 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (.ci/start-services installs it)")
async def test_wrk_sends_every_request_its_own_prompt_unless_told_to_repeat(start_upstream) -> None:  # type: ignore[no-untyped-def]
    # The proxy remembers what its rules found in prompts seen lately: a bench repeating one
    # body would measure that memory, not traffic whose prompts differ. `bench throughput`
    # warms up with one wrk run, then measures with another: a second run that numbered its
    # prompts from 1 again sent the warm-up's prompts a second time.
    up = await start_upstream(record=True)
    body = loadgen.chat_body("gpt-4o-mini", 32)
    sent = 0
    for threads in (1, 2):
        res = await asyncio.to_thread(wrk.run, up.base_url + "/chat/completions", body, 1, 4, threads, True)
        assert res.requests > 10 and res.non_2xx == 0 and res.errors == 0  # each body's length as sent
        sent += res.requests
    turns = [r["body"]["messages"][-1]["content"] for r in up.options.requests]
    assert len(turns) >= sent
    assert len(set(turns)) == len(turns)
    up.options.requests.clear()
    await asyncio.to_thread(wrk.run, up.base_url + "/chat/completions", body, 1, 4, 1, False)
    turns = [r["body"]["messages"][-1]["content"] for r in up.options.requests]
    assert len(turns) > 10
    assert len(set(turns)) == 1


def test_a_run_of_several_workers_says_how_busy_each_was(capsys: pytest.CaptureFixture[str]) -> None:
    # A worker given few of wrk's kept-alive connections idles while the other is full: the
    # run then measures less than two workers, and says so.
    res: dict[str, object] = {}
    before, after = {10: 1.0, 11: 5.0, 12: 5.0}, {10: 1.1, 11: 9.5, 12: 6.0}  # pid 10: the supervisor
    scenarios._worker_split(res, before, after, 10, 5)
    assert res["worker_cpu_s"] == [1.0, 4.5]
    out = capsys.readouterr().out
    assert "workers' CPU over the run: 1.00 s, 4.50 s of 5 s each" in out
    assert "half idle" in out
    scenarios._worker_split(res, before, {10: 1.1, 11: 9.5, 12: 9.0}, 10, 5)
    assert "half idle" not in capsys.readouterr().out
