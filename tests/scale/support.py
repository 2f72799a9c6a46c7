"""Real `edgeroute serve` processes for the scale tests, always killed by PID at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import eventually, wait_ready
from tests.serve_support import free_port
from tests.test_cost_support import PG_DSN, REDIS_URL

__all__ = ["PG_DSN", "REDIS_URL", "wait_ready"]


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return sorted(out)


@dataclass
class Instance:
    proc: asyncio.subprocess.Process
    port: int
    config: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


Spawn = Callable[..., Awaitable[Instance]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts `edgeroute serve` with a config (dict) and extra flags; waits until ready."""
    started: list[Instance] = []

    async def start(cfg: dict[str, Any], *flags: str, port: int | None = None, name: str = "i") -> Instance:
        port = port or free_port()
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = tmp_path / f"{name}-{len(started)}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edgeroute", "serve", "--config", str(path), "--port", str(port), *flags,
                stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        inst = Instance(proc, port, path, log)
        started.append(inst)
        try:
            await wait_ready(inst.url, proc=proc)
            if "--workers" in flags:  # one worker answering is not all of them: the supervisor says when

                async def all_listen() -> bool:
                    return "workers)" in inst.output()

                await eventually(all_listen, "the supervisor saying all workers listen")
        except AssertionError:
            raise AssertionError(inst.output()[-3000:]) from None
        return inst

    yield start
    for inst in started:
        kill_tree(inst.proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inst.proc.wait(), 10)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its children, by PID (never by name)."""
    for child in children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in `url`'s /metrics (None: absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and (labels is None or labels.items() <= sample.labels.items()):
                return float(sample.value)
    return None
