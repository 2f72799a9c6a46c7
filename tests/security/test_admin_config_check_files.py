"""`POST /admin/config/check` reads no file of the host: a learned model file is checked for
its form alone, as a TLS file or a secret reference is.

The route is a viewer's (a dashboard's key), and the check is offline, "neither executing
what it is sent nor telling its sender which files the host has". But `learning.task_model`
and `learning.router_model` were read as given: the answer told a viewer whether any path
existed and was readable by the proxy ("No such file or directory", "missing ERLM magic",
"file is truncated": /etc/shadow read as root), a FIFO held the check (and with it every
later check, 429 `check_busy`) for good, and `/dev/zero` was read until memory ran out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import simple_config

VIEWER = "tok-viewer-0123456789"


def _text(router_model: Path) -> str:
    return (
        "providers: {p: {base_url: 'http://127.0.0.1:1/v1', api_key: env:NOT_READ}}\n"
        "deployments: {d: {provider: p, model: gpt-4o-mini}}\n"
        "models: {m: {deployments: [d]}}\n"
        f"learning: {{task_model: builtin, router_model: '{router_model}'}}\n"
    )


async def test_a_config_check_reads_no_model_file(start_upstream: Any, start_proxy: Any, tmp_path: Path) -> None:
    cfg = simple_config({"a": await start_upstream()})
    cfg["keys"] = {"dash": {"token": VIEWER, "role": "viewer"}}
    proxy = await start_proxy(cfg)
    auth = {"Authorization": f"Bearer {VIEWER}"}
    secret = tmp_path / "secret.txt"
    secret.write_text("sk-live-0123456789abcdef\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def check(path: Path) -> dict[str, Any]:
                async with s.post(proxy.url + "/admin/config/check", data=_text(path), headers=auth) as r:
                    assert r.status == 200, await r.text()
                    return dict(await r.json())

            missing, present = await check(tmp_path / "nothing-here"), await check(secret)
            # Whether a path exists, and what it starts with, is not told.
            assert missing == present == {"ok": True, "errors": [], "references": "unresolved"}
            # A FIFO (or a device) is not opened: the check answers, and the next one runs.
            assert (await check(fifo))["ok"] is True
            assert (await check(secret))["ok"] is True
    finally:
        # Before the fix a worker thread waits in open() on the FIFO: a writer lets it go.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else None
        if fd is not None:
            os.close(fd)


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading
        return False
    return True
