"""A closed-loop load from `wrk` (a native load generator; Debian package `wrk`) instead of
the Python one, for `bench throughput --generator wrk`.

On a machine whose cores the proxy shares with the load generator and the mock, the
generator's own CPU per request caps what the proxy can be shown to serve: Python's costs
about as much as the proxy, wrk's a small fraction. wrk posts one chat body (a Lua script
sets the method, headers and body; with `distinct`, each request's prompt is its own),
reports requests per second and non-2xx answers; its CPU time is read from the kernel once
it has exited.
"""

from __future__ import annotations

import re
import resource
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeroute.bench import loadgen

_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
"""

# With `distinct`: every request's prompt is its own, as `loadgen.numbered` writes it, with
# the number zero-padded to a fixed width so that the request is formatted once (on the first
# call: wrk's `init` sets the Host header after this script loads) and each request is then
# one concatenation. Formatting each request whole (a body built, then the request around
# it) cost wrk a fifth more CPU a request, which the proxy's cores paid for. The numbers
# start where no other run's or thread's do: a run starting again at 1 sent its warm-up's
# prompts a second time.
_DISTINCT = """local cut = string.find(wrk.body, '{marker}', 1, true)
local head, tail = string.sub(wrk.body, 1, cut - 1), string.sub(wrk.body, cut)
local threads = 0
setup = function(thread)
  thread:set("first", {start} + threads * {per_thread})
  threads = threads + 1
end
local n, before, after = nil, nil, nil
local format = string.format
request = function()
  if before == nil then
    local whole = wrk.format(nil, nil, nil, head .. " (request {zeros})" .. tail)
    local at = string.find(whole, " (request {zeros})", 1, true)
    before, after = string.sub(whole, 1, at + 9), string.sub(whole, at + 10 + {width})
    n = first
  end
  n = n + 1
  return before .. format("%0{width}d", n) .. after
end
"""
_WIDTH = 15  # digits of a request's number (exact in Lua's doubles)
_PER_THREAD = 10**11  # numbers a thread may send before the next thread's


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    non_2xx: int
    errors: int  # connect, read, write and timeout errors
    elapsed_s: float
    cpu_s: float  # wrk's own user + system time

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


def available() -> bool:
    return shutil.which("wrk") is not None


def run(url: str, body: bytes, seconds: float, connections: int, threads: int = 1, distinct: bool = False) -> WrkResult:
    """`wrk` against `url` (a full path, e.g. …/v1/chat/completions) for `seconds`; with
    `distinct`, `body` (a `loadgen.chat_body`) carries each request's number in its last turn."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        text = _SCRIPT.format(body=body_path)
        marker = loadgen.LAST_TURN_END.decode()
        if distinct and marker in body.decode():
            start = secrets.randbelow(10**14)  # a run's numbers: within 10**15, as are its threads'
            text += _DISTINCT.format(
                marker=marker, zeros="0" * _WIDTH, width=_WIDTH, start=start, per_thread=_PER_THREAD
            )
        script.write_text(text)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "-s", str(script)]
        out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse(out, cpu)


_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}  # wrk's units for a run's length


def parse(out: str, cpu_s: float) -> WrkResult:
    """Reads wrk's summary: `N requests in 10.00s`, `Non-2xx or 3xx responses: K`, socket errors."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", out)
    if done is None:
        raise RuntimeError(f"wrk's output was not understood: {out[-500:]!r}")
    elapsed = float(done.group(2)) * _SECONDS[done.group(3)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        int(done.group(1)),
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(int(x) for x in errors.groups()) if errors else 0,
        elapsed,
        cpu_s,
    )
