"""Helpers for the governance tests (no tests here): edgeroute as a real process, admin calls."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.serve_support import free_port


class Instance:
    """`edgeroute serve` in a subprocess on a free loopback port."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeroute", "serve", "--config", str(config), "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.log_path = log

    def wait_ready(self, timeout: float = 30.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeroute exited: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/healthz", timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"edgeroute did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # only the process this helper started
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def instances(config: Path, n: int) -> Iterator[list[Instance]]:
    started = [Instance(config, config.parent / f"edgeroute-{i}.log") for i in range(n)]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.stop()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def call(
    method: str, url: str, token: str | None = None, json: Any = None, data: str | None = None
) -> tuple[int, Any]:
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=hdrs, json=json, data=data) as r:
        return r.status, await r.json()


def ledger_sql(config_dir: Path, sql: str) -> None:
    """Runs one statement on the ledger of a server whose config is in `config_dir` (its
    default path), as an operator's `sqlite3` would: triggers that make a store fail."""
    conn = sqlite3.connect(config_dir / "edgeroute-ledger.db", timeout=10)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


@contextlib.contextmanager
def store_statements(app: Any) -> Iterator[list[str]]:
    """The SQL a SQLite ledger's governance store runs while in the block, as SQLite traces it:
    how a test counts the store's lookups and writes from the database's side."""
    from edgeroute.governance.runtime import GOV

    conn: sqlite3.Connection = app[GOV].store._conn
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


@contextlib.asynccontextmanager
async def served_file(path: Path, cfg: dict[str, Any] | None = None) -> AsyncIterator[str]:
    """edgeroute in this process on the config file `path` (`cfg` written to it first, when
    given), so reloads and rollbacks have a file to read and write; yields its base URL. Served
    by edgeroute's own HTTP server, as `edgeroute serve` serves it."""
    from edgeroute import config as config_mod
    from edgeroute.server import create_app
    from tests.conftest import ProxyTestServer

    if cfg is not None:
        write_config(path, cfg)
    server = ProxyTestServer(create_app(config_mod.load(path), str(path)), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()
