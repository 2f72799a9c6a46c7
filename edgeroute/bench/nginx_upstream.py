"""An upstream that costs next to nothing per request, for `bench throughput --upstream nginx`.

On a machine whose cores the proxy shares with the load generator and the upstream, what
the upstream spends per request comes out of what the proxy can be shown to serve: the
Python mock costs a fifth to a third of the proxy's CPU per request, so two workers on two
cores cannot show how they scale. nginx (Debian package `nginx-light`) answers every
`POST /v1/chat/completions` with one canned, complete OpenAI `chat.completion` (usage
included, as a provider sends it) for a few microseconds of CPU. It is a single process
(`master_process off`), so its CPU time is its own, and it writes nothing outside its
temporary directory. Only non-streaming chat: the scenario's one request shape.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from edgeroute.mock.openai import completion_body

MODEL = "gpt-4o-mini"


def available() -> bool:
    return shutil.which("nginx") is not None


def answer() -> bytes:
    """The canned answer: a finished chat completion with its usage."""
    return completion_body("chatcmpl-nginx", 1_700_000_000, MODEL, "The quick brown fox.", "stop", 12, 6)


def config(port: int, root: Path) -> str:
    """An nginx configuration serving the canned answer on 127.0.0.1:`port`, all its files under `root`."""
    body = answer().decode().replace("\\", "\\\\").replace("'", "\\'")
    models = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0}]}).decode()
    temp = " ".join(f"{k}_temp_path {root / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    # The whole request (headers and the bench's 7 kB body) in one read: with the default 1k
    # buffer nginx read the headers, then discarded the body in 4k reads (3 receives and an
    # ioctl a request, 5 system calls where 2 do; 0.0067 -> 0.0052 ms of CPU a request).
    client_header_buffer_size 16k;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{models}';
        }}
    }}
}}
"""


def start(port: int, root: Path, preexec: Callable[[], None] | None = None) -> subprocess.Popen[bytes]:
    """nginx on `port`, ready to answer (raises RuntimeError when it does not come up)."""
    exe = shutil.which("nginx")
    if exe is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(config(port, root))
    proc = subprocess.Popen(
        [exe, "-c", str(conf), "-p", str(root), "-e", str(root / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"nginx exited at start: {err.strip()[:500]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    raise RuntimeError("nginx did not start listening within 10 s")
