"""Instructions a cache hit (or, with `--proxied`, a proxied request) costs the proxy, thread
by thread, under callgrind.

Wall-clock figures on a machine shared with other jobs move by more than most changes to the
hit path; instruction counts do not. `edgeroute serve` (from `--tree` when given) runs under
valgrind's callgrind with counting off; after a warm-up, every request a hit, counting is
turned on for `--requests` sequential hits on one keep-alive connection and, once the ledger
has written them (two flush intervals), off again. Prints the instructions a hit of each
thread: the event loop's (thread 1) and the ledger writer's apart. The writer's figure
depends on its batches (a few dozen records here, a thousand or more under `bench
throughput`): compare it between builds measured here, not with the closed loop's.

With `--proxied` the cache is off: every request goes to the bench's mock upstream, and the
writer writes its ledger row and request-log record (with its attempt) as `serve` does.

With `--stream N [M ...]` requests are streamed (and proxied): the mock answers N tokens, one SSE
event each, `--tps` a second (paced as a model streams: each event its own read and relay; 0
sends them in one burst). Two token counts give the cost of one more relayed event (the slope).
The slope holds the loop's idle work over an event's interval too (its timers: ~0.7M
instructions a second on the bench's config, ~2k an event at 400 tokens a second), and a slow
host merges some events into one read: compare builds at one `--tps`, alternating.

    python -m edgeroute.bench.hit_instructions [--requests 400] [--proxied] [--stream 16 64 [--tps 400]]
        [--tree OTHER] [--out DIR]

Needs valgrind (Debian: valgrind); ~30 s for 400 hits.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from edgeroute.bench import loadgen
from edgeroute.bench import stack as ST
from edgeroute.bench.scenarios import CACHE_EVERYTHING

WARMUP = 60
FLUSH_S = 0.5  # the ledger's flush interval (its default)


def _request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _answer(sock: socket.socket, request: bytes) -> bytes:
    """Sends `request`, returns the answer's head (the body read whole, by its Content-Length or,
    a stream's, to its last chunk after `data: [DONE]`)."""
    sock.sendall(request)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed the connection")
        got += chunk
        head, sep, body = got.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if length is None:
                if b"chunked" not in head.lower():
                    raise RuntimeError(f"an answer without Content-Length: {head[:300]!r}")
                if body.endswith(b"\r\n0\r\n\r\n"):
                    if b"data: [DONE]" not in body:
                        raise RuntimeError(f"a stream without [DONE]: {body[-300:]!r}")
                    return head
            elif len(body) >= int(length.group(1)):
                return head


def per_thread(out_dir: Path, hits: int) -> dict[int, float]:
    """Instructions a hit by thread number, from callgrind's `--separate-threads` files."""
    found: dict[int, float] = {}
    for f in sorted(out_dir.glob("callgrind.out.*-*")):
        totals = re.search(r"^totals: (\d+)", f.read_text(errors="replace"), re.M)
        if totals is not None and int(totals.group(1)) > 0:
            found[int(f.name.rsplit("-", 1)[1])] = int(totals.group(1)) / hits
    return found


def measure(
    hits: int,
    prompt_tokens: int,
    out_dir: Path,
    tree: str | None,
    proxied: bool = False,
    stream_tokens: int = 0,
    tps: float = 0.0,
) -> dict[int, float]:
    """Instructions a request by thread; `stream_tokens` > 0: streamed requests of that many tokens."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    proxied = proxied or stream_tokens > 0
    with ST.Stack(False) as stack:
        mock = stack.upstream(*(["--tokens", str(stream_tokens), "--tps", str(tps)] if stream_tokens else []))
        url = f"http://127.0.0.1:{mock.port}/v1"
        cfg = ST.bench_config({"p0": url, "p1": url})
        if not proxied:
            cfg["models"][ST.PUBLIC_MODEL]["cache"] = CACHE_EVERYTHING
        cfg["ledger"] = {"backend": "sqlite", "path": str(out_dir / "ledger.db"), "flush_interval": FLUSH_S}
        config = out_dir / "edgeroute.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        port = ST.free_port()
        env = dict(os.environ, PYTHONPATH=tree) if tree else None
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={out_dir}/callgrind.out.%p", sys.executable, "-m", "edgeroute", "serve",
                "-c", str(config), "--port", str(port)]  # fmt: skip
        with open(out_dir / "stderr", "wb") as err:
            proxy = subprocess.Popen(argv, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=err)
        try:
            ST.wait_ready(f"http://127.0.0.1:{port}/readyz", proxy, timeout=300)
            body = loadgen.chat_body(ST.PUBLIC_MODEL, prompt_tokens, stream=stream_tokens > 0)
            # Hits repeat one body; proxied requests each have a prompt of their own (as
            # traffic does: the core remembers what its rules found in prompts seen lately).
            requests = (_request(port, loadgen.numbered(body, n) if proxied else body) for n in itertools.count())
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for _ in range(WARMUP):
                    head = _answer(sock, next(requests))
                if not head.startswith(b"HTTP/1.1 200") or proxied == (b"x-edgeroute-cache: hit" in head.lower()):
                    raise RuntimeError(f"the warm-up did not end in {'answers' if proxied else 'hits'}: {head[:500]!r}")
                time.sleep(2 * FLUSH_S)  # the warm-up's records written before counting starts
                subprocess.run(["callgrind_control", "-i", "on", str(proxy.pid)], check=True, capture_output=True)
                for _ in range(hits):
                    _answer(sock, next(requests))
                time.sleep(2 * FLUSH_S)  # the hits' records written
                subprocess.run(["callgrind_control", "-i", "off", str(proxy.pid)], check=True, capture_output=True)
        finally:
            proxy.terminate()
            proxy.wait(120)
    return per_thread(out_dir, hits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m edgeroute.bench.hit_instructions",
        description="Instructions a cache hit costs the proxy, thread by thread, under callgrind.",
    )
    p.add_argument("--requests", type=int, default=400, help="hits counted (after a warm-up of 60)")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="the chat body's size, as in `bench throughput`")
    p.add_argument("--proxied", action="store_true", help="the cache off: proxied requests, not hits")
    p.add_argument(
        "--stream",
        type=int,
        nargs="+",
        metavar="TOKENS",
        help="streamed requests of this many tokens (one run each; two give the cost of one more event)",
    )
    p.add_argument("--tps", type=float, default=400.0, help="--stream: tokens a second from the mock (0: one burst)")
    p.add_argument("--tree", help="run the proxy from this source tree (a checkout with its extension built)")
    p.add_argument(
        "--out", help="keep callgrind's files here (callgrind_annotate them); default: a temporary directory"
    )
    a = p.parse_args(argv)
    names = {1: "event loop", 2: "ledger writer"}
    loop: dict[int, float] = {}
    for tokens in a.stream or [0]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(a.out or tmp) / (f"stream{tokens}" if tokens else "")
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob("callgrind.out.*"):
                old.unlink()
            found = measure(a.requests, a.prompt_tokens, out, a.tree, a.proxied, tokens, a.tps)
        what = f"{tokens}-token stream" if tokens else "proxied request" if a.proxied else "hit"
        print(f"instructions a {what} ({a.requests} of them, {a.prompt_tokens}-token body, callgrind):")
        for thread, per in found.items():
            print(f"  thread {thread} ({names.get(thread, 'other')}): {per / 1000:.1f}k")
        loop[tokens] = found.get(1, 0.0)
    if len(loop) > 1:
        (t0, i0), (t1, i1) = sorted(loop.items())[0], sorted(loop.items())[-1]
        print(f"event loop, one more relayed event: {(i1 - i0) / (t1 - t0) / 1000:.1f}k ({t0} -> {t1} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
