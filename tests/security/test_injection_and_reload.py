"""Header injection, log injection, spoofable request ids, and a malicious config reload.

- Header injection: the only client value echoed in a header is its `x-request-id`, as
  `x-edgeroute-correlation-id`, and only when it is a plain token.
- Request ids: `x-request-id` in answers, the ledger and feedback is always edgeroute's own
  (a client's would be spoofable and collide); the client's is kept as `correlation_id`.
- Log injection: line breaks and terminal escapes in values that reach a log line (an
  upstream's message, a path) are escaped: one event stays one line.
- Malicious config reload: a config whose key points at a file such as /etc/shadow, or a
  config file that is itself such a file, is refused without echoing the file's contents.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from edgeroute import redact
from tests.conftest import eventually
from tests.security.conftest import Leaky, leaky_config
from tests.serve_support import start_serve
from tests.test_serve import wait_ready

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
SHADOW = "root:$6$s4ltS4lt$Zm9vYmFyYmF6cXV4cXV1eGNvcmdl:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


async def test_request_ids_are_ours_and_the_clients_is_a_correlation_id(leaky: Leaky, start_proxy) -> None:
    """Spoofable ids: two clients sending the same `x-request-id` get distinct ids of ours;
    theirs is echoed as `x-edgeroute-correlation-id` and recorded as `correlation_id`."""
    leaky.mode = "ok"
    proxy = await start_proxy(leaky_config(leaky))
    client = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="unused", default_headers={"x-request-id": "job-42"}
    )
    answers = [await client.chat.completions.with_raw_response.create(**BODY) for _ in range(2)]  # type: ignore[call-overload]
    await client.close()
    ids = [a.headers["x-request-id"] for a in answers]
    assert ids[0] != ids[1] and all(i.startswith("req_") for i in ids)
    assert all(a.headers["x-edgeroute-correlation-id"] == "job-42" for a in answers)
    recs = list(proxy.recorder.records)
    assert [r.request_id for r in recs] == ids and all(r.correlation_id == "job-42" for r in recs)


@pytest.mark.parametrize("rid", ["x" * 200, "a b", "a;b=c", "caf\u00e9", "<script>", "a,b", "-leading"])
async def test_header_injection_odd_correlation_ids_are_not_echoed(leaky: Leaky, start_proxy, rid: str) -> None:
    """Header injection: a client id that is not a plain token (long, spaces, separators,
    non-ASCII) is neither echoed nor recorded; the request is served."""
    leaky.mode = "ok"
    proxy = await start_proxy(leaky_config(leaky))
    async with aiohttp.ClientSession() as s:
        hdrs = {"x-request-id": rid.encode("utf-8").decode("latin-1")}
        async with s.post(proxy.url + "/v1/chat/completions", json=BODY, headers=hdrs) as r:
            assert r.status == 200
            assert "x-edgeroute-correlation-id" not in r.headers
            assert r.headers["x-request-id"].startswith("req_")
        # An error answer carries the same headers.
        async with s.post(proxy.url + "/v1/chat/completions", json={**BODY, "model": "nope"}, headers=hdrs) as r:
            assert r.status == 404 and "x-edgeroute-correlation-id" not in r.headers
    assert proxy.recorder.records[0].correlation_id is None


def test_log_injection_values_are_escaped_and_redacted() -> None:
    """Log injection: a value with a line break and terminal escapes stays on one line."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    redact.install_log_filter(handler)
    logger = logging.getLogger("edgeroute.test_log_injection")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("unhandled error on %s %s", "POST", "/v1/x\nCRITICAL forged entry\x1b[2J\u2028")
        logger.warning("upstream said: %s", {"msg": "Bearer sk-abcdefghijklmnop0123"})
        try:
            raise ValueError("dsn postgresql://u:pa55word-secret@db/x")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "WARNING unhandled error on POST /v1/x\\nCRITICAL forged entry\\x1b[2J\\u2028"
    assert "\x1b" not in text and not any(line.startswith("CRITICAL") for line in lines)
    assert "sk-abcdefghijklmnop0123" not in text and "pa55word-secret" not in text
    assert "Traceback" in text  # the exception is still logged, redacted


async def test_log_injection_through_an_upstream_message(leaky: Leaky, tmp_path: Path) -> None:
    """`edgeroute serve`: an upstream's message with line breaks and escapes, logged for the
    operator (a 401 from the upstream), is one escaped line; the decision log stays JSON lines."""
    leaky.mode = 401
    leaky.extra = "\n2026-01-01 00:00:00,000 CRITICAL edgeroute: forged\x1b[31m red"
    cfg = leaky_config(leaky, server={"decision_log": True})
    serving = await start_serve(tmp_path / "c.yaml", cfg, stdout=asyncio.subprocess.PIPE)
    proc, url = serving.proc, serving.url
    try:
        await wait_ready(url, proc=proc)
        async with aiohttp.ClientSession() as s:
            hdrs = {"x-request-id": "corr-1"}
            body = {"model": "m", "messages": [{"role": "user", "content": "hi\n\x1b[31m"}]}
            async with s.post(url + "/v1/chat/completions", json=body, headers=hdrs) as r:
                assert r.status == 502
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    log = err.decode()
    assert "refused our credentials" in log
    assert "\x1b" not in log
    assert not any(line.startswith("2026-01-01 00:00:00,000 CRITICAL") for line in log.splitlines()), log


async def _reload(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(url + "/admin/reload") as r:
        return r.status, await r.text()


async def test_malicious_config_reload_never_echoes_file_contents(
    leaky: Leaky, start_upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Malicious config reload: a key pointing at /etc/shadow (or a look-alike), a config file
    that is itself such a file, a binary file or a multi-line environment variable: refused
    with an error that names the reference but never shows the contents; the running config
    (and its key) stays."""
    from aiohttp.test_utils import TestServer

    from edgeroute import config as config_mod
    from edgeroute.accounting import MemoryRecorder
    from edgeroute.server import create_app

    leaky.mode = "ok"
    shadow = tmp_path / "shadow"
    shadow.write_text(SHADOW)
    binary = tmp_path / "blob"
    binary.write_bytes(b"\xff\xfe\x00\x01binary")
    monkeypatch.setenv("MULTILINE_KEY", "line1\nX-Injected: yes")
    path = tmp_path / "c.yaml"
    good = leaky_config(leaky, api_key="sk-good-0123456789abcdef")
    path.write_text(yaml.safe_dump(good))
    app = create_app(config_mod.load(path), str(path), MemoryRecorder())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = f"http://127.0.0.1:{server.port}"
    hostile = [f"file:{shadow}", "file:/etc/shadow", f"file:{binary}", "env:MULTILINE_KEY"]
    try:
        for ref in hostile:
            path.write_text(yaml.safe_dump(leaky_config(leaky, api_key=ref)))
            status, text = await _reload(url)
            assert status == 400, (ref, text)
            assert "s4ltS4lt" not in text and "root:" not in text and "X-Injected" not in text, text
        path.write_text(SHADOW)  # the config file itself replaced by a sensitive file
        status, text = await _reload(url)
        assert status == 400 and "s4ltS4lt" not in text and "root:" not in text, text
        async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=BODY) as r:
            assert r.status == 200
        assert leaky.seen[-1]["Authorization"] == "Bearer sk-good-0123456789abcdef"
        assert all("X-Injected" not in h for h in leaky.seen)
    finally:
        await server.close()


async def test_log_injection_through_the_request_log_table(start_upstream, tmp_path: Path) -> None:
    """Log injection: a client-chosen model name (recorded for a refused request) with terminal
    escapes and a line break is printed escaped by `edgeroute logs`, on one line."""
    import subprocess

    from tests.test_cost_support import cost_proxy
    from tests.test_requestlog import _two_upstream_config

    good = await start_upstream()
    cfg = _two_upstream_config(good.base_url, good.base_url, tmp_path / "log.db")
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    evil = "x\x1b[2J\x1b[31m\n2026-01-01 forged row"
    async with cost_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**BODY, "model": evil}) as r:
            assert r.status == 404

        async def logged() -> bool:  # the request log is written in batches, off the request path
            async with s.get(proxy.url + "/admin/requests") as r:
                return len((await r.json())["data"]) == 1

        await eventually(logged, "the refused request in the request log")
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeroute", "logs", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\\x1b[2J" in out.stdout
    assert not any(line.startswith("2026-01-01 forged") for line in out.stdout.splitlines())
