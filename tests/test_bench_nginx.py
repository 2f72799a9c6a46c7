"""`bench throughput --upstream nginx`: nginx answers as an OpenAI upstream would, through the proxy too."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import urllib.request
from pathlib import Path

import openai
import orjson
import pytest

from edgeroute.bench import nginx_upstream, wrk
from edgeroute.bench.stack import Stack

pytestmark = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx is not installed (.ci/start-services installs nginx-light)"
)


def test_the_canned_answer_is_a_chat_completion_the_sdk_reads() -> None:
    with Stack(pin=False) as stack:
        up = stack.nginx()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}])
        assert got.choices[0].message.content == "The quick brown fox."
        assert got.choices[0].finish_reason == "stop"
        assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (12, 6)
        assert [m.id for m in client.models.list()] == [nginx_upstream.MODEL]
        assert up.cpu_seconds() >= 0 and up.alive()
    assert not up.alive()  # the stack stops what it started


async def test_the_proxy_serves_nginx_answers_under_load(start_proxy) -> None:  # type: ignore[no-untyped-def]
    with Stack(pin=False) as stack:
        up = stack.nginx()
        cfg = {
            "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
        }
        proxy = await start_proxy(cfg)
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        got = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert got.choices[0].message.content == "The quick brown fox."
        if shutil.which("wrk") is not None:  # kept-alive connections under a closed loop: every answer a 200
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            res = await asyncio.to_thread(wrk.run, proxy.url + "/v1/chat/completions", body, 1, 8)
            assert res.requests > 0 and res.non_2xx == 0 and res.errors == 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def _workers_answering(port: int, connections: int = 32) -> set[int]:
    """The workers that answer `connections` new connections (the kernel spreads them)."""
    seen = set()
    for _ in range(connections):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/deployments", timeout=10) as r:
            seen.add(orjson.loads(r.read())["worker"])
    return seen


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_throughputs_placement_shields_no_worker_count_from_the_generator_and_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker 1 starts half a second late: the bench must not load the proxy before it listens (it
    # did once /readyz answered, from worker 0, and wrk's kept-alive connections all went there).
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('EDGEROUTE_WORKER_ID') == '1':\n    time.sleep(0.5)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    cpus = sorted(os.sched_getaffinity(0))
    with Stack() as shielded:  # the other scenarios: the proxy's CPU its own
        assert os.sched_getaffinity(shielded.nginx().pid) == set(cpus[:-1])
    with Stack(shield=False) as stack:  # `throughput`: one worker or two, the same placement
        up = stack.nginx()
        assert os.sched_getaffinity(up.pid) == set(cpus)
        assert os.sched_getaffinity(0) == set(cpus)  # the generator's too (wrk is started from here)
        cfg = {
            "providers": {"p": {"base_url": f"http://127.0.0.1:{up.port}/v1", "api_key": "k"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
        }
        proxy, _ = stack.proxy(cfg, workers=2, cpu_affinity=True)
        assert _workers_answering(proxy.port) == {0, 1}
        assert [os.sched_getaffinity(w) for w in _children(proxy.pid)] == [{cpus[0]}, {cpus[1]}]
        assert stack.placement(2, cpu_affinity=True) == (
            "each worker pinned to one CPU (serve --cpu-affinity); "
            "generator and upstream on every CPU (the proxy's shared)"
        )
        assert (
            stack.placement(1)
            == f"the proxy pinned to CPU {cpus[-1]}; generator and upstream on every CPU (the proxy's shared)"
        )
