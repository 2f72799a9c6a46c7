"""`edgeroute serve` as a real process: start-up, SIGTERM drain, exit code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import simple_config, wait_ready
from tests.serve_support import killed, start_serve

__all__ = ["wait_ready"]  # imported from here by other tests


async def test_sigterm_drains_in_flight_stream_then_exits_0(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(chunk_interval=0.1, reply_words=12)
    cfg = simple_config({"a": up}, server={"drain_timeout": 10, "decision_log": True})
    serving = await start_serve(tmp_path / "c.yaml", cfg, stdout=asyncio.subprocess.PIPE)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url)
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "drain"}], "stream": True}
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                first = await r.content.readany()
                assert first
                os.kill(proc.pid, signal.SIGTERM)
                rest = await r.content.read()
            text = (first + rest).decode()
            # The stream in flight when SIGTERM arrived finished whole.
            assert text.rstrip().endswith("data: [DONE]")
            assert '"finish_reason":"stop"' in text
        code = await asyncio.wait_for(proc.wait(), 15)
        assert code == 0
        # Spend went to the embedded default ledger, SQLite beside the config, flushed on the drain.
        import sqlite3

        with sqlite3.connect(tmp_path / "edgeroute-ledger.db") as db:
            rows = db.execute("SELECT route, deployment, outcome FROM spend").fetchall()
        assert rows == [("m", "d-a", "ok")]
        # The decision log: one JSON line for the request, with the decision and no secret.
        assert proc.stderr is not None
        lines = [json.loads(x) for x in (await proc.stderr.read()).decode().splitlines() if x.startswith("{")]
        assert [(x["route"], x["deployment"], x["why"], x["outcome"]) for x in lines] == [
            ("m", "d-a", ["default route for model=m"], "ok")
        ]
        assert "key-a" not in json.dumps(lines)
        # And nothing listens any more.
        async with aiohttp.ClientSession() as s:
            try:
                async with s.get(url + "/healthz") as r:
                    raise AssertionError(f"still serving: {r.status}")
            except aiohttp.ClientConnectionError:
                pass
    finally:
        await killed(proc)


@pytest.mark.parametrize("flags", [(), ("--workers", "2")], ids=["one process", "workers"])
async def test_a_reload_asked_while_starting_is_applied_once_serving(
    start_upstream, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """A SIGHUP that came before the server had set its handler (a `systemctl reload` right after
    `systemctl start`: systemd's `Type=exec` counts it started at once) ended the process, and
    `Restart=on-failure` does not restart one that SIGHUP ended: the service stayed down. Now the
    reload is applied once the server listens: the config written before it is the one served."""
    up = await start_upstream()
    cfg = simple_config({"a": up})
    path = tmp_path / "c.yaml"
    serving = await start_serve(path, cfg, *flags)
    proc, url = serving.proc, serving.url
    try:
        # The ledger's lock file is made early in the start, seconds before the server listens.
        lock = tmp_path / "edgeroute-ledger.db.lock"
        for _ in range(5000):
            if lock.exists() or proc.returncode is not None:
                break
            await asyncio.sleep(0.002)
        assert lock.exists()
        cfg["models"]["m2"] = {"deployments": ["d-a"]}
        path.write_text(yaml.safe_dump(cfg))
        os.kill(proc.pid, signal.SIGHUP)
        await wait_ready(url, within=30, proc=proc)

        async def models() -> set[str]:  # as every worker serves them (new connections spread)
            seen: set[str] = set()
            for _ in range(6):
                async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as r:
                    found = {m["id"] for m in (await r.json())["data"]}
                seen = found if not seen else seen & found
            return seen

        for _ in range(100):  # the reload runs in the background once the server listens
            if "m2" in await models():
                break
            await asyncio.sleep(0.05)
        assert await models() == {"m", "m2"}
        assert proc.returncode is None
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


async def test_a_reload_asked_while_draining_does_not_cut_the_drain(start_upstream, tmp_path: Path) -> None:
    """Once draining, the server had given SIGHUP back its default action: a reload asked then
    (`kill -HUP` from a config tool, a stray `systemctl reload`) killed it, cutting the streams
    it was finishing and losing the ledger's last flush. Now it is ignored until the exit."""
    up = await start_upstream(chunk_interval=0.1, reply_words=20)
    cfg = simple_config({"a": up}, server={"drain_timeout": 10})
    serving = await start_serve(
        tmp_path / "c.yaml", cfg, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url, proc=proc)
        assert proc.stdout is not None
        assert b"listening" in await proc.stdout.readline()
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "drain"}], "stream": True}
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                first = await r.content.readany()
                os.kill(proc.pid, signal.SIGTERM)
                assert b"draining" in await asyncio.wait_for(proc.stdout.readline(), 10)
                os.kill(proc.pid, signal.SIGHUP)
                rest = await r.content.read()
        assert (first + rest).decode().rstrip().endswith("data: [DONE]")
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await killed(proc)
