"""`edgeroute serve` as a real process, for the tests that need one: a free loopback port, the
config written, the process started and, at the end, killed by its PID if it is still there."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    """A loopback port free now, for a server another process will bind later. Chosen below the
    kernel's ephemeral range: a port that `bind(0)` hands out comes from that range, where any
    process's outgoing connection may take it before the server binds it (seen under load:
    "Address already in use" at a server's start)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 20_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # that range full: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@dataclass(frozen=True, slots=True)
class Serving:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_serve(
    path: Path,
    cfg: dict[str, Any],
    *flags: str,
    stdout: Any = asyncio.subprocess.DEVNULL,
    stderr: Any = asyncio.subprocess.PIPE,
    **options: Any,
) -> Serving:
    """Writes `cfg` to `path` on a free port (its `server.port`, set in `cfg` too) and starts
    `edgeroute serve --config path *flags`; not yet ready (`wait_ready`). `options` go to
    `asyncio.create_subprocess_exec` (`env`, `preexec_fn`)."""
    port = _write_config(path, cfg)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeroute", "serve", "--config", str(path), *flags,
        stdout=stdout, stderr=stderr, **options,
    )  # fmt: skip
    return Serving(proc, port)


def _write_config(path: Path, cfg: dict[str, Any]) -> int:
    port = free_port()
    cfg.setdefault("server", {})["port"] = port
    path.write_text(yaml.safe_dump(cfg))
    return port


async def killed(proc: asyncio.subprocess.Process) -> None:
    """Kills `proc` (by its PID) unless it has exited, and reaps it."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
