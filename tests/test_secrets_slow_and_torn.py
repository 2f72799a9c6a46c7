"""Secrets by reference against a real `edgeroute serve`, when their source misbehaves: an
`exec:` command that takes seconds (a Vault or cloud CLI waiting on its server) while a
reload resolves it, and a `file:` secret rewritten in place (truncated, then written) rather
than replaced. Clients keep being served, with the last good value, and nothing of a secret
reaches the logs."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import openai
import yaml

from tests.conftest import Upstream, eventually, simple_config, wait_ready
from tests.serve_support import killed, start_serve


def _cfg(up: Upstream, ref: str) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["api_key"] = ref
    cfg["governance"] = {"secrets_refresh": 0.5}
    return cfg


async def _ask(url: str) -> float:
    """One chat completion through the proxy with the OpenAI SDK; its latency in seconds."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    t0 = time.monotonic()
    try:
        r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
    finally:
        await client.close()
    return time.monotonic() - t0


async def test_a_reload_that_runs_a_slow_secret_command_serves_meanwhile(start_upstream, tmp_path: Path) -> None:
    """The reload's secret command ran on the event loop: every request (and /healthz) waited
    for it, up to its 10 s timeout, while the process looked hung."""
    up = await start_upstream(record=True)
    started, release = tmp_path / "started", tmp_path / "release"
    script = tmp_path / "vault.py"
    # A CLI that says when it runs, then waits (bounded) for its server before printing the key.
    script.write_text(
        "import pathlib, sys, time\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "t = time.monotonic()\n"
        f"while not pathlib.Path({str(release)!r}).exists() and time.monotonic() - t < 8: time.sleep(0.02)\n"
        "print('sk-from-vault-' + sys.argv[1])\n"
    )
    path = tmp_path / "c.yaml"
    cfg = _cfg(up, "file:" + str(tmp_path / "first-key"))
    (tmp_path / "first-key").write_text("sk-first\n")
    serving = await start_serve(path, cfg)
    try:
        await wait_ready(serving.url, proc=serving.proc)
        await _ask(serving.url)
        cfg["providers"]["a"]["api_key"] = f"exec:{shlex.quote(sys.executable)} {shlex.quote(str(script))} two"
        path.write_text(yaml.safe_dump(cfg))
        os.kill(serving.proc.pid, signal.SIGHUP)
        await eventually(lambda: asyncio.sleep(0, started.exists()), "the secret command started", 10)
        # While the command waits, clients are served (by the running config, its old key).
        took = [await _ask(serving.url) for _ in range(5)]
        # Waiting for the command would take until its own 8 s bound (it is released below).
        assert max(took) < 4.0, f"requests waited for the reload's secret command: {took}"
        assert up.options.requests[-1]["headers"]["Authorization"] == "Bearer sk-first"
        release.touch()

        async def applied() -> bool:
            await _ask(serving.url)
            return bool(up.options.requests[-1]["headers"]["Authorization"] == "Bearer sk-from-vault-two")

        await eventually(applied, "the reloaded key in use", 10)
    finally:
        await killed(serving.proc)


async def test_a_secret_file_rewritten_in_place_never_sends_a_torn_key(start_upstream, tmp_path: Path) -> None:
    """A file truncated and then written (`echo sk-new > key`, an editor, a slow copy): the
    refresh read the empty or half-written file and sent it as the key (`Bearer `, `Bearer
    sk-ne`: the provider's 401s) until the next read."""
    up = await start_upstream(record=True)
    key = tmp_path / "openai-key"
    key.write_text("sk-old-value\n")
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serving = await start_serve(tmp_path / "c.yaml", _cfg(up, f"file:{key}"), stderr=err)
        try:
            await wait_ready(serving.url, proc=serving.proc)
            await _ask(serving.url)
            seen: set[str] = set()

            async def keys_sent(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await _ask(serving.url)
                    seen.add(up.options.requests[-1]["headers"]["Authorization"])
                    await asyncio.sleep(0.05)

            with key.open("r+") as f:  # in place: truncated, then written in two parts
                f.truncate(0)
                f.flush()
                os.fsync(f.fileno())
                await keys_sent(1.6)  # past a refresh of the empty file
                f.write("sk-ne")
                f.flush()
                os.fsync(f.fileno())
                await keys_sent(0.4)  # a part, seen by a refresh at most once
                f.write("w-value\n")

            async def new_in_use() -> bool:
                await _ask(serving.url)
                return bool(up.options.requests[-1]["headers"]["Authorization"] == "Bearer sk-new-value")

            await eventually(new_in_use, "the new key in use", 10)
            assert seen <= {"Bearer sk-old-value", "Bearer sk-new-value"}, seen
        finally:
            await killed(serving.proc)
    text = log.read_text()
    assert "sk-old" not in text and "sk-ne" not in text


async def test_an_exec_secret_that_prints_bytes_not_text_keeps_the_last_good_value(
    start_upstream, tmp_path: Path
) -> None:
    """A secrets CLI that starts printing binary garbage (a wrong format flag, a broken pipe
    to a pager) with status 0: its bytes were decoded with replacement characters and sent
    as the provider key, in place of the good one."""
    up = await start_upstream(record=True)
    broken = tmp_path / "broken"
    script = tmp_path / "vault.py"
    script.write_text(
        "import pathlib, sys\n"
        f"if pathlib.Path({str(broken)!r}).exists(): sys.stdout.buffer.write(b'\\xff\\xfesk-x')\n"
        "else: print('sk-exec-good')\n"
    )
    ref = f"exec:{shlex.quote(sys.executable)} {shlex.quote(str(script))}"
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serving = await start_serve(tmp_path / "c.yaml", _cfg(up, ref), stderr=err)
        try:
            await wait_ready(serving.url, proc=serving.proc)
            await _ask(serving.url)
            assert up.options.requests[-1]["headers"]["Authorization"] == "Bearer sk-exec-good"
            broken.touch()

            async def refused() -> bool:
                return "could not be refreshed" in log.read_text()

            await eventually(refused, "the garbled refresh refused", 10)
            await _ask(serving.url)
            assert up.options.requests[-1]["headers"]["Authorization"] == "Bearer sk-exec-good"
        finally:
            await killed(serving.proc)
    assert "sk-exec-good" not in log.read_text()
