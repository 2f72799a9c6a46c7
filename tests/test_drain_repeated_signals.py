"""A stop signal repeated while `edgeroute serve` drains, against the real process: the same
stop asked again (systemd's `KillMode=control-group` signals every process of the service and
the supervisor relays its own; a terminal's Ctrl-C reaches the whole process group; an
operator's second `kill`). The drain goes on: the streams in flight finish, and every
finished request is in the ledger once the process exits.

A second SIGTERM found SIGTERM's default action back (the drain had removed the handlers):
the process died at once, cutting the streams and losing the records the ledger had not
written yet (247 of 311 finished requests)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp
import orjson

from tests.test_cost_ledger import _drive, _ids, _serve


async def _stream(url: str) -> tuple[str, bytes]:
    """A chat stream read to its end: its request id and its bytes."""
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "tell me a long story " * 3}]}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        return r.headers["x-request-id"], await r.read()


async def test_a_second_sigterm_while_draining_finishes_the_drain(start_upstream, tmp_path: Path) -> None:
    up = await start_upstream(chunk_interval=0.2)  # a stream of ~17 chunks over ~3.5 s
    proc, url, db = _serve(tmp_path, up.base_url, 1.0)
    try:
        stream = asyncio.create_task(_stream(url))
        done = await _drive(url, 0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        seen = []  # other lines may come first (a loaded host's event-loop stall warning)
        while not seen or "draining" not in seen[-1]:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line and len(seen) < 50, "serve never said it was draining:\n" + "".join(seen)
            seen.append(line)
        for sig in (signal.SIGTERM, signal.SIGINT):  # asked again, by each path
            proc.send_signal(sig)
            await asyncio.sleep(0.2)
        rid, raw = await stream
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and orjson.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert _ids(db) == {r for r, _ in done} | {rid}
    with sqlite3.connect(db) as c:  # each once
        assert c.execute("SELECT COUNT(*) FROM spend").fetchone()[0] == len(done) + 1
