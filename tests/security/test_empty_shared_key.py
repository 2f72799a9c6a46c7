"""An operator's typo: a shared client key (`server.api_keys`) that resolves to nothing.

`env:EDGE_KEY` with the variable set but empty (docker compose's `${EDGE_KEY}` on a host that
lacks it sets it so, with a warning) or a literal `""` made the empty string a key. A request
with no key at all was compared as the empty token and matched it: every route was open to
anyone who reached the port, admin routes included, where a keyless sidecar at least keeps
them to loopback. Such a key is refused when the config loads, naming it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgeroute import config as config_mod
from edgeroute.config import ConfigError
from tests.conftest import simple_config, wait_ready
from tests.serve_support import killed, start_serve


@pytest.mark.parametrize("reference", ["env:ER_TEST_EMPTY_KEY", ""])
async def test_an_empty_shared_key_is_refused_at_start(start_upstream: Any, tmp_path: Path, reference: str) -> None:
    up = await start_upstream()
    cfg = simple_config({"a": up}, server={"api_keys": ["sk-shared-0123456789abcdef", reference]})
    serving = await start_serve(tmp_path / "edgeroute.yaml", cfg, env={**os.environ, "ER_TEST_EMPTY_KEY": ""})
    try:
        with contextlib.suppress(AssertionError):  # "exited before it was ready": what is expected
            await wait_ready(serving.url, proc=serving.proc)
            # It is serving: what a caller without any key gets (it read the whole config).
            async with aiohttp.ClientSession() as s, s.get(serving.url + "/admin/config") as r:
                pytest.fail(f"served with an empty key: GET /admin/config without a key -> {r.status}")
        await serving.proc.wait()
        assert serving.proc.stderr is not None
        err = (await serving.proc.stderr.read()).decode()
        assert serving.proc.returncode != 0
        assert "server.api_keys[1]" in err and "empty" in err, err
    finally:
        await killed(serving.proc)


@pytest.mark.parametrize(
    "key",
    [
        {"token": "env:ER_TEST_EMPTY_KEY"},
        {"token_sha256": "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"},
    ],
    ids=["env-empty", "sha256-of-nothing"],
)
async def test_a_virtual_key_of_nothing_is_refused_at_load(
    start_upstream: Any, monkeypatch: pytest.MonkeyPatch, key: dict[str, str]
) -> None:
    """The same typo on a virtual key: a key no client could send, kept silently as a dead key."""
    monkeypatch.setenv("ER_TEST_EMPTY_KEY", "")
    cfg = simple_config({"a": await start_upstream()}, keys={"app": key, "ops": {"token": "sk-ops-0123456789abcdef"}})
    with pytest.raises(ConfigError) as ei:
        config_mod.parse(cfg, "edge.yaml")
    assert "keys.app.token: is empty" in str(ei.value) and "keys.ops" not in str(ei.value)
