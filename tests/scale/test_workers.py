"""`edgeroute serve --workers N`: one port, restarts, signals forwarded, one /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from tests.conftest import simple_config
from tests.scale.support import Spawn, children, metric


async def _chat(url: str, content: str = "hi") -> int:
    # A new connection per request, so the kernel may hand each to another worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        body = {"model": "m", "messages": [{"role": "user", "content": content}]}
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            return r.status


async def _chat_retried(url: str) -> int:
    """One retry on a reset connection: the kernel resets connections that were queued to a
    worker when it died (or when its replacement starts), as a client of any restarted server sees."""
    try:
        return await _chat(url)
    except aiohttp.ClientConnectionError:
        return await _chat(url)


async def _model_everywhere(url: str, model: str) -> bool:
    """Whether every worker serves `model` (12 fresh connections, spread by the kernel)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        seen = []
        for _ in range(12):
            async with s.get(url + "/v1/models") as r:
                seen.append(model in {m["id"] for m in (await r.json())["data"]})
    return all(seen)


async def _until(cond, within: float, every: float = 0.1) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if await cond():
            return time.monotonic() - t0
        await asyncio.sleep(every)
    raise AssertionError("condition not met in time")


async def test_workers_share_one_port_and_one_metrics_endpoint(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream()
    inst = await spawn(simple_config({"a": up}), "--workers", "2")
    workers = children(inst.proc.pid)
    assert len(workers) == 2
    assert "(2 workers)" in inst.output()
    assert {frozenset(os.sched_getaffinity(w)) for w in workers} == {frozenset(os.sched_getaffinity(0))}  # not pinned
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x")
    reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    statuses = await asyncio.gather(*(_chat(inst.url) for _ in range(39)))
    assert statuses == [200] * 39
    # Whichever worker takes the scrape, the counters are the whole server's.
    for _ in range(4):
        assert await metric(inst.url, "edgeroute_requests_total", {"route": "m", "status": "200"}) == 40
        assert await metric(inst.url, "edgeroute_workers") == 2
    up0 = await metric(inst.url, "edgeroute_worker_up", {"worker": "0"})
    up1 = await metric(inst.url, "edgeroute_worker_up", {"worker": "1"})
    assert (up0, up1) == (1, 1)


async def test_a_killed_worker_is_restarted_while_the_other_serves(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream()
    inst = await spawn(simple_config({"a": up}), "--workers", "2")
    victim, survivor = children(inst.proc.pid)
    os.kill(victim, signal.SIGKILL)

    async def dead() -> bool:
        return not _alive(victim)

    await _until(dead, 10)
    # Requests go on: the kernel hands new connections to the listening worker only.
    statuses = await asyncio.gather(*(_chat_retried(inst.url) for _ in range(20)))
    assert statuses == [200] * 20, inst.output()[-4000:]

    async def replaced() -> bool:
        now = children(inst.proc.pid)
        return len(now) == 2 and survivor in now and victim not in now

    await _until(replaced, 20)

    async def counted() -> bool:
        return await metric(inst.url, "edgeroute_worker_restarts_total") == 1 and (
            await metric(inst.url, "edgeroute_workers") == 2
        )

    await _until(counted, 20)
    assert "exited with signal SIGKILL" in inst.output()


async def test_a_reload_while_a_worker_restarts_does_not_end_it(start_upstream, spawn: Spawn) -> None:
    """A SIGHUP (a `systemctl reload`, or a config applied through a sibling's admin API) that
    reached a worker the supervisor had just restarted, before its handler was set, ended it:
    restarted again, after twice the delay, and counted as a crash. Now it reloads once ready."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    inst = await spawn(cfg, "--workers", "2")
    victim = children(inst.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)

    async def starting() -> bool:  # the replacement exists but cannot be ready yet (it is importing)
        now = children(inst.proc.pid)
        return len(now) == 2 and victim not in now

    await _until(starting, 20, every=0.005)
    cfg["models"]["m2"] = {"deployments": ["d-a"]}
    inst.config.write_text(yaml.safe_dump(cfg))
    os.kill(inst.proc.pid, signal.SIGHUP)

    await _until(lambda: _model_everywhere(inst.url, "m2"), 20)

    async def counted() -> bool:
        return await metric(inst.url, "edgeroute_workers") == 2

    await _until(counted, 20)
    assert await metric(inst.url, "edgeroute_worker_restarts_total") == 1, inst.output()[-2000:]
    assert "exited with signal SIGHUP" not in inst.output()


async def test_sighup_reloads_every_worker_and_sigterm_drains_all(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream(chunk_interval=0.05, reply_words=30)
    cfg = simple_config({"a": up}, server={"drain_timeout": 10})
    inst = await spawn(cfg, "--workers", "2")
    workers = children(inst.proc.pid)
    cfg["models"]["m2"] = {"deployments": ["d-a"]}
    inst.config.write_text(yaml.safe_dump(cfg))
    os.kill(inst.proc.pid, signal.SIGHUP)

    await _until(lambda: _model_everywhere(inst.url, "m2"), 20)
    assert await _chat(inst.url) == 200
    assert children(inst.proc.pid) == workers  # reloaded in place, not restarted

    # SIGTERM while a stream runs: it finishes whole, every worker exits, then the supervisor with 0.
    async with aiohttp.ClientSession() as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "drain"}], "stream": True}
        async with s.post(inst.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            first = await r.content.readany()
            os.kill(inst.proc.pid, signal.SIGTERM)
            rest = await r.content.read()
    assert (first + rest).decode().rstrip().endswith("data: [DONE]")
    assert await asyncio.wait_for(inst.proc.wait(), 30) == 0
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_bad_worker_counts_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeroute.cli import main

    for bad in ("0", "many", "-3", "100000"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--config", "c.yaml", "--workers", bad])
        assert e.value.code == 2
        assert "--workers" in capsys.readouterr().err


async def test_workers_share_one_budget_without_redis(start_upstream, spawn: Spawn) -> None:
    """No shared_state: the workers' budgets live in one SQLite file, so 100 concurrent
    requests against a budget with room for 10 admit exactly 10, whichever worker takes them."""
    up = await start_upstream(reply_words=40, latency_ms=20)
    cost = 5 * 2.0 / 1e6
    cfg = {
        "providers": {"a": {"base_url": up.base_url, "api_key": "k"}},
        "deployments": {"d-a": {"provider": "a", "model": "x", "price": {"input_per_mtok": 0, "output_per_mtok": 2.0}}},
        "models": {"m": {"deployments": ["d-a"]}},
        "budgets": {"limits": [{"name": "g", "scope": "global", "limit_usd": cost * 10.5}]},
        "ledger": {"backend": "memory"},
    }
    inst = await spawn(cfg, "--workers", "2")

    async def ask() -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            async with s.post(inst.url + "/v1/chat/completions", json=body) as r:
                await r.read()
                return r.status

    statuses = await asyncio.gather(*(ask() for _ in range(100)))
    assert statuses.count(200) == 10 and statuses.count(429) == 90
    # Both workers served (each admitted some, or refused some): the budget was one.
    for _ in range(3):
        assert await metric(inst.url, "edgeroute_requests_total", {"route": "m", "status": "200"}) == 10


async def test_workers_share_ejections_without_redis(start_upstream, spawn: Spawn) -> None:
    """One worker's circuit opening takes the deployment out in the other worker too,
    though that one never sent it a request after the outage began."""
    bad, good = await start_upstream(), await start_upstream()
    cfg = simple_config({"a": bad, "b": good}, health={"consecutive_failures": 2, "base_ejection_ms": 60_000})
    inst = await spawn(cfg, "--workers", "2")
    bad.options.fail_status = 503

    async def circuits() -> list[float | None]:
        return [
            await metric(inst.url, "edgeroute_deployment_circuit_state", {"deployment": "d-a", "worker": str(w)})
            for w in (0, 1)
        ]

    for _ in range(60):  # fail over to b each time, until one worker opens d-a
        assert await _chat(inst.url) == 200
        if 2.0 in await circuits():
            break
    else:
        raise AssertionError("no worker opened d-a's circuit")

    async def both_open() -> bool:
        return await circuits() == [2.0, 2.0]

    await _until(both_open, 10)


async def test_an_admin_reload_through_one_worker_reaches_all(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up})
    inst = await spawn(cfg, "--workers", "2")
    workers = children(inst.proc.pid)
    cfg["models"]["m3"] = {"deployments": ["d-a"]}
    inst.config.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as s, s.post(inst.url + "/admin/reload") as r:
        assert r.status == 200  # answered by one worker; the supervisor tells the other
    await _until(lambda: _model_everywhere(inst.url, "m3"), 20)
    assert children(inst.proc.pid) == workers


def _cpus_of(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of `pid` (one set when they all run on the same CPUs)."""
    return {frozenset(os.sched_getaffinity(int(t.name))) for t in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
async def test_cpu_affinity_pins_each_worker_whole_to_a_cpu_of_its_own(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream()
    cpus = sorted(os.sched_getaffinity(0))
    inst = await spawn(simple_config({"a": up}), "--workers", "2", "--cpu-affinity")
    first, second = children(inst.proc.pid)
    # Every thread of a worker (event loop, ledger writer, pools) on the worker's one CPU.
    assert _cpus_of(first) == {frozenset({cpus[0]})}
    assert _cpus_of(second) == {frozenset({cpus[1]})}
    assert _cpus_of(inst.proc.pid) == {frozenset(cpus)}  # the supervisor is not pinned
    assert f"workers pinned to CPUs {cpus[0]}, {cpus[1]} (--cpu-affinity)" in inst.output()
    client = openai.AsyncOpenAI(base_url=inst.url + "/v1", api_key="x")
    reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
async def test_cpu_affinity_pins_a_single_process_to_its_first_cpu(start_upstream, spawn: Spawn) -> None:
    up = await start_upstream()
    first = min(os.sched_getaffinity(0))
    inst = await spawn(simple_config({"a": up}), "--cpu-affinity")
    assert _cpus_of(inst.proc.pid) == {frozenset({first})}
    assert f"pinned to CPU {first}" in inst.output()


def test_a_cpu_that_cannot_be_had_leaves_the_worker_unpinned(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgeroute.workers import worker

    before = os.sched_getaffinity(0)
    monkeypatch.setenv(worker.ENV_CPU, "0")
    assert worker.pin() is None  # outside a supervisor's worker the variable means nothing
    monkeypatch.setenv(worker.ENV_ID, "0")
    monkeypatch.setenv(worker.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(worker.ENV_CPU, str(max(before) + 4096))  # no such CPU: the worker still serves
    assert worker.pin() is None
    assert os.sched_getaffinity(0) == before
    assert "cannot pin to CPU" in capsys.readouterr().err
