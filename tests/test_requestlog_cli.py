"""`edgeroute logs` and `edgeroute stats`, run as a user runs them, against a live proxy's log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import yaml

from tests.conftest import eventually
from tests.governance_support import call
from tests.metrics_support import ledger_written
from tests.test_cost_restart import Served
from tests.test_cost_support import cost_proxy
from tests.test_requestlog import _two_upstream_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeroute", *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


async def _ask(client: openai.AsyncOpenAI, model: str) -> None:
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


async def test_logs_and_stats_from_the_command_line(start_upstream: Any, tmp_path: Path) -> None:
    good = await start_upstream()
    bad = await start_upstream(fail_status=503)
    cfg = _two_upstream_config(good.base_url, bad.base_url, tmp_path / "log.db")
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    async with cost_proxy(cfg) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        for model in ("m", "m", "flaky"):
            await _ask(client, model)
        await ledger_written(proxy.url, 3)

        out = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--format", "jsonl")
        assert out.returncode == 0, out.stderr
        lines = [orjson.loads(x) for x in out.stdout.splitlines()]
        assert [x["model"] for x in lines] == ["m", "m", "flaky"]  # oldest first
        flaky = lines[-1]

        table = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--model", "flaky")
        assert table.returncode == 0 and flaky["id"] in table.stdout and "d-good" in table.stdout
        assert table.stdout.splitlines()[0].split()[:3] == ["ts", "id", "model"]

        one = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--id", flaky["id"])
        detail = orjson.loads(one.stdout)
        assert [a["deployment"] for a in detail["attempts"]] == ["d-bad", "d-good"]

        stats = await asyncio.to_thread(_cli, "stats", "-c", str(path), "--group-by", "model", "--format", "json")
        rows = {r["group"]: r["requests"] for r in orjson.loads(stats.stdout)["rows"]}
        assert rows == {"m": 2, "flaky": 1}
        text = await asyncio.to_thread(_cli, "stats", "-c", str(path), "--group-by", "deployment")
        assert "TOTAL" in text.stdout and "d-bad" in text.stdout and "p95_ms" in text.stdout

        bad_since = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--since", "yesterday")
        assert bad_since.returncode == 2 and "--since" in bad_since.stderr and "Traceback" not in bad_since.stderr
        bad_group = await asyncio.to_thread(_cli, "stats", "-c", str(path), "--group-by", "colour")
        assert bad_group.returncode == 2 and "--group-by" in bad_group.stderr

        # --follow prints what arrives after it started.
        argv = ["logs", "-c", str(path), "--follow", "--format", "jsonl", "--limit", "1"]
        follow = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "edgeroute", *argv], stdout=subprocess.PIPE, text=True
        )
        try:
            assert follow.stdout is not None
            backlog = orjson.loads(await asyncio.to_thread(follow.stdout.readline))
            assert backlog["id"] == flaky["id"]
            await _ask(client, "m")
            fresh = orjson.loads(await asyncio.wait_for(asyncio.to_thread(follow.stdout.readline), 15))
            assert fresh["model"] == "m" and fresh["id"] not in {x["id"] for x in lines}
        finally:
            follow.kill()  # the process this test started
            follow.wait(5)
        await client.close()


def test_logs_without_a_database_says_so(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    cfg = _two_upstream_config("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", tmp_path / "none.db")
    path.write_text(yaml.safe_dump(cfg))
    out = _cli("logs", "-c", str(path))
    assert out.returncode == 1 and "does not exist yet" in out.stderr


async def test_a_managed_keys_name_is_beside_its_id(start_upstream: Any, tmp_path: Path) -> None:
    """The request log and its stats by key named a managed key by its id alone (`k…`), which
    says nothing to an operator; spend by key showed its name. Now every view of them does,
    to a viewer too (it reads the names in spend by key already), and to a team's viewer for
    its team's keys."""
    up = await start_upstream()
    cfg = _two_upstream_config(up.base_url, up.base_url, tmp_path / "log.db")
    cfg["keys"] = {
        "root": {"token": "tok-root", "role": "admin"},
        "watcher": {"token": "tok-viewer", "role": "viewer"},
        "team-watcher": {"token": "tok-team-viewer", "role": "viewer", "team": "billing"},
    }
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    served = await Served.start(path)
    try:
        status, made = await call(
            "POST", served.url + "/admin/keys", "tok-root", json={"name": "billing-bot", "team": "billing"}
        )
        assert status == 201, made
        key = made["id"]
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=made["secret"], max_retries=0)
        for _ in range(2):
            await _ask(client, "m")
        await client.close()

        async def logged() -> Any:
            status, page = await call("GET", served.url + f"/admin/requests?key={key}", "tok-viewer")
            return page if status == 200 and len(page["data"]) == 2 else None

        page = await eventually(logged, "the key's requests in the log")
        assert {(r["key"], r["key_name"]) for r in page["data"]} == {(key, "billing-bot")}
        status, one = await call("GET", served.url + f"/admin/requests/{page['data'][0]['id']}", "tok-viewer")
        assert status == 200 and one["key_name"] == "billing-bot", one
        status, stats = await call("GET", served.url + "/admin/stats?group_by=key&since=1h", "tok-viewer")
        assert status == 200, stats
        assert [(r["group"], r["name"], r["requests"]) for r in stats["rows"]] == [(key, "billing-bot", 2)]
        status, mine = await call("GET", served.url + "/admin/requests", "tok-team-viewer")
        assert status == 200 and {r["key_name"] for r in mine["data"]} == {"billing-bot"}, mine
    finally:
        served.kill()

    table = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--key", key)
    assert table.returncode == 0, table.stderr
    assert sum(f"{key} (billing-bot)" in line for line in table.stdout.splitlines()) == 2, table.stdout
    jsonl = await asyncio.to_thread(_cli, "logs", "-c", str(path), "--format", "jsonl")
    assert {orjson.loads(x)["key_name"] for x in jsonl.stdout.splitlines()} == {"billing-bot"}
    text = await asyncio.to_thread(_cli, "stats", "-c", str(path), "--group-by", "key", "--since", "1h")
    assert text.returncode == 0, text.stderr
    head, row = text.stdout.splitlines()[:2]
    assert head.split()[:3] == ["group", "name", "requests"] and row.split()[:3] == [key, "billing-bot", "2"]
