"""Provider keys by `file:` and `exec:` reference, rotated in place and applied without a
restart; a failed refresh keeps the last good value, is counted and never logs the value."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeroute import redact, secrets
from tests.conftest import Upstream, eventually, simple_config
from tests.test_governance_keys import _proxy


async def _key_seen(url: str, up: Upstream) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    return str(up.options.requests[-1]["headers"]["Authorization"])


async def _until(url: str, up: Upstream, want: str, seconds: float = 5.0) -> float:
    t0 = time.monotonic()
    while (got := await _key_seen(url, up)) != want:
        assert time.monotonic() - t0 < seconds, f"still sending {got!r}"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def _failing(before: int, ref: str) -> bool:
    """A refresh failed since `before` was read, and `ref` is listed as failing."""
    return secrets.STATUS.refresh_failures_total > before and any(ref in f for f in secrets.STATUS.failing)


def _cfg(up: Upstream, ref: str, **gov: Any) -> dict[str, Any]:
    cfg = simple_config({"a": up})
    cfg["providers"]["a"]["api_key"] = ref
    cfg["governance"] = {"secrets_refresh": 0.5, **gov}
    return cfg


async def test_file_secret_rotates_in_place(start_upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    up = await start_upstream(record=True)
    key = tmp_path / "openai-key"
    key.write_text("sk-one\n")
    caplog.set_level(logging.INFO)
    async with _proxy(_cfg(up, f"file:{key}")) as url:
        assert await _key_seen(url, up) == "Bearer sk-one"
        # As Kubernetes does: a new file moved over the old one.
        new = tmp_path / "..data-new"
        new.write_text("sk-two\n")
        new.replace(key)
        took = await _until(url, up, "Bearer sk-two")
        print(f"file secret applied {took:.2f} s after the change")
        # The file disappears (a broken mount): the last good value stays, and that is counted.
        before = secrets.STATUS.refresh_failures_total
        key.unlink()
        await eventually(lambda: _failing(before, str(key)), "the refresh that could not read the file", within=10)
        assert await _key_seen(url, up) == "Bearer sk-two"
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
            exposed = {x.name: x.value for f in text_string_to_metric_families(await r.text()) for x in f.samples}
        assert exposed["edgeroute_secrets_failing"] >= 1
        assert exposed["edgeroute_secret_refresh_failures_total"] > before
        key.write_text("sk-three\n")
        await _until(url, up, "Bearer sk-three")
        assert not any(str(key) in f for f in secrets.STATUS.failing)
    for secret in ("sk-one", "sk-two", "sk-three"):
        assert secret not in caplog.text
    assert "could not be refreshed" in caplog.text


async def test_exec_secret_refreshes_and_survives_failures(
    start_upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = await start_upstream(record=True)
    source = tmp_path / "vault"
    source.write_text("sk-exec-1")
    script = tmp_path / "fetch.py"
    # A CLI that prints the secret, and on failure prints part of it to stderr (which must not be logged).
    script.write_text(
        "import sys, pathlib\n"
        f"p = pathlib.Path({str(source)!r})\n"
        "if not p.exists():\n"
        "    sys.stderr.write('denied; last token was sk-exec-2'); sys.exit(3)\n"
        "print(p.read_text())\n"
    )
    ref = f"exec:{shlex.quote(sys.executable)} {shlex.quote(str(script))}"
    caplog.set_level(logging.INFO)
    async with _proxy(_cfg(up, ref)) as url:
        assert await _key_seen(url, up) == "Bearer sk-exec-1"
        source.write_text("sk-exec-2")
        await _until(url, up, "Bearer sk-exec-2")
        before = secrets.STATUS.refresh_failures_total
        source.unlink()
        await eventually(lambda: _failing(before, ref), "the refresh whose command failed", within=10)
        assert await _key_seen(url, up) == "Bearer sk-exec-2"  # the last good value
    assert "exited with status 3" in caplog.text
    assert "sk-exec" not in caplog.text


def test_bad_exec_reference_is_a_config_error(tmp_path: Path) -> None:
    from edgeroute import config as config_mod

    cfg = simple_config({})
    cfg.update(
        providers={"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "exec:/nonexistent/vault read"}},
        deployments={"d": {"provider": "a", "model": "x"}},
        models={"m": {"deployments": ["d"]}},
    )
    with pytest.raises(config_mod.ConfigError, match=r"providers\.a\.api_key: secret command not found"):
        config_mod.parse(cfg)
    with secrets.offline():  # a check sent over the API: nothing runs, nothing is read or registered
        assert secrets.resolve("exec:/nonexistent/vault read").reveal() == "exec:/nonexistent/vault read"
        assert secrets.resolve("env:NOT_SET_ANYWHERE_2").reveal() == "env:NOT_SET_ANYWHERE_2"
        secrets.resolve("an-ordinary-phrase-sent-in-a-check")
    assert redact.text("an-ordinary-phrase-sent-in-a-check") == "an-ordinary-phrase-sent-in-a-check"
