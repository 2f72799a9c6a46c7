"""A keyless server listening beyond loopback says so when it starts.

Without keys, the sidecar's `Host` and `Origin` checks stop web pages, not programs: any client
that reaches a port bound to `0.0.0.0` (the Docker image's default) may call the upstreams at
the operator's expense. Refusing to start would break the documented "keyless trusts whoever
reaches it"; a warning at start, naming the remedy, is what the operator can act on.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import simple_config, wait_ready
from tests.serve_support import killed, start_serve

WARNING = "no keys are configured and edgeroute listens on"


async def _stderr_of_a_start(start_upstream: Any, tmp_path: Path, **server: Any) -> str:
    up = await start_upstream()
    serving = await start_serve(tmp_path / "edgeroute.yaml", simple_config({"a": up}, server=server))
    try:
        await wait_ready(serving.url, proc=serving.proc)
        serving.proc.send_signal(signal.SIGTERM)
        await serving.proc.wait()
        assert serving.proc.stderr is not None
        return (await serving.proc.stderr.read()).decode()
    finally:
        await killed(serving.proc)


async def test_a_keyless_server_on_every_interface_warns_at_start(start_upstream: Any, tmp_path: Path) -> None:
    err = await _stderr_of_a_start(start_upstream, tmp_path, host="0.0.0.0")
    assert f"{WARNING} 0.0.0.0" in err and "server.api_keys" in err, err


@pytest.mark.parametrize(
    "server",
    [{"host": "127.0.0.1"}, {"host": "0.0.0.0", "api_keys": ["sk-shared-0123456789abcdef"]}],
    ids=["loopback", "keyed"],
)
async def test_a_loopback_or_keyed_server_starts_quietly(
    start_upstream: Any, tmp_path: Path, server: dict[str, Any]
) -> None:
    err = await _stderr_of_a_start(start_upstream, tmp_path, **server)
    assert WARNING not in err, err
