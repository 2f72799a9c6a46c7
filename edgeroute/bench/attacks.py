"""`edgeroute bench attack`: hostile clients against a proxy, and whether everyone else is still served.

Each attack runs for `duration` seconds against one proxy of the bench's realistic config (50
rules, default limits) while a probe process sends a chat request and a health check every
`PROBE_EVERY_S`. An attack holds when every probe was answered 200, the health checks' p99 (the
proxy's event loop alone) stayed under `probe_p99_ms`, and the proxy's RSS rose by less than
`rss_mb`. The chat probes' latencies are reported too; their upstream mock shares a CPU with the
attacker, so they also measure the bench rig. The attacks are the ones that took the proxy down
or stalled it before a fix (tests under tests/security/ hold each fix): this command is the
standing check that they still fail, on any build, in one run.

Every attack is bounded in time and in the connections and bytes it opens, and goes to the
proxy this command started, on 127.0.0.1 only. The attackers' models have mocks of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from edgeroute.bench.stack import PUBLIC_MODEL, Common, Stack, bench_config, say, write_result
from edgeroute.http_server import raise_open_file_limit

PROBE_EVERY_S = 0.05
# The attackers' models have mocks of their own: the probes' upstream is then not slowed by
# parsing the attackers' bodies, which is the mock's work, not the proxy's.
LONG_MODEL = "long"  # streams a long answer slowly (slow readers)
BULK_MODEL = "bulk"  # takes any body: no context window (big bodies, hostile counts)


@dataclass(frozen=True)
class Bounds:
    """What an attack may cost everyone else before it counts as a success for the attacker."""

    probe_p99_ms: float = 1000.0
    # A body costs the proxy about 2.5 times its size while it is decided and sent on: at the
    # default `server.max_body_bytes_in_flight` (256 MiB), a body flood grows it by ~650 MB.
    rss_mb: float = 800.0


@dataclass
class Probes:
    """Ordinary requests sent during an attack: chat requests (through the proxy to a mock whose
    CPU the attacker shares) and health checks (the proxy's own event loop alone), their
    latencies (ms) and what failed."""

    latencies: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @staticmethod
    def p(values: list[float], q: float) -> float | None:
        if not values:
            return None
        s = sorted(values)
        return round(s[min(len(s) - 1, int(q * len(s)))], 2)


async def _probe(url: str, seconds: float) -> Probes:
    """A chat request and a health check every `PROBE_EVERY_S` for `seconds` (in a process of its
    own: the attacker's work in this one would delay the probe's reads and pass for the proxy's)."""
    body = {"model": PUBLIC_MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}
    out = Probes()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            for path, into in (("/v1/chat/completions", out.latencies), ("/healthz", out.health)):
                started = time.perf_counter()
                try:
                    call = s.post(url + path, json=body) if into is out.latencies else s.get(url + path)
                    async with call as r:
                        await r.read()
                        if r.status != 200:
                            out.failures.append(f"{path} status {r.status}")
                        else:
                            into.append((time.perf_counter() - started) * 1000)
                except (TimeoutError, aiohttp.ClientError) as e:
                    out.failures.append(f"{path} {type(e).__name__}")
            await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.perf_counter() - t0)))
    return out


async def _probe_process(url: str, seconds: float) -> Probes:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeroute.bench.attacks", "--probe", url, str(seconds), stdout=asyncio.subprocess.PIPE
    )
    data, _ = await proc.communicate()
    try:
        got = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Probes(failures=[f"the probe process exited {proc.returncode}"])
    return Probes(got["latencies"], got["health"], got["failures"])


# -- the attacks: each runs until `stop` is set, then lets go of what it holds -----------------


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.transport.abort()


async def idle_connections(port: int, stop: asyncio.Event) -> dict[str, Any]:
    """Open connections and send nothing, as fast as they are accepted (each holds a file)."""
    own_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = max(100, min(3000, own_limit - 256))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    refused = 0
    while not stop.is_set() and len(held) < cap:
        try:
            held.append(await _open(port))
        except OSError:
            refused += 1
            await asyncio.sleep(0.01)
    await stop.wait()
    closed_by_proxy = sum(1 for r, _ in held if r.at_eof())  # shed, or past its header timeout
    _close_all([w for _, w in held])
    return {"opened": len(held), "refused": refused, "closed_by_proxy": closed_by_proxy}


async def slowloris(port: int, stop: asyncio.Event, connections: int = 500) -> dict[str, Any]:
    """Connections that send a request's headers one byte a second and never finish them."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: "
    held: list[asyncio.StreamWriter] = []
    for _ in range(connections):
        with contextlib.suppress(OSError):
            w = (await _open(port))[1]
            w.write(head)
            held.append(w)
    while not stop.is_set():
        for w in held:
            if not w.is_closing():
                w.write(b"a")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    dropped = sum(1 for w in held if w.is_closing())
    _close_all(held)
    return {"opened": len(held), "dropped_while_held": dropped}


async def slow_readers(port: int, stop: asyncio.Event, clients: int = 200) -> dict[str, Any]:
    """Ask for long streams and never read them (a tiny receive buffer fills at once)."""
    body = orjson.dumps({"model": LONG_MODEL, "stream": True, "messages": [{"role": "user", "content": "a long one"}]})
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    held: list[socket.socket] = []
    statuses: dict[str, int] = {}
    for _ in range(clients):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(req)
            held.append(s)
        except OSError:
            s.close()
    for s in held:  # the status line only: the rest stays unread
        s.settimeout(5)
        try:
            key = s.recv(12).split(b" ")[1].decode()
        except (OSError, IndexError):
            key = "no answer"
        statuses[key] = statuses.get(key, 0) + 1
    await stop.wait()
    for s in held:
        s.close()
    return {"streams_opened": len(held), "statuses": statuses}


async def big_bodies(
    port: int, stop: asyncio.Event, clients: int = 60, mb: float = 8.0, link_mb_s: float = 125.0
) -> dict[str, Any]:
    """Clients that each send a large body, over and over, `link_mb_s` MB/s in all (a gigabit
    link: on loopback a sender is limited by memory speed alone, as no remote client is)."""
    filler = "x " * int(mb * 1024 * 1024 / 2)
    body = orjson.dumps({"model": BULK_MODEL, "messages": [{"role": "user", "content": filler}]})
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    piece = 64 * 1024
    per_client_s = piece / (link_mb_s * 1024 * 1024 / clients)  # seconds between one client's pieces
    statuses: dict[str, int] = {}

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, w = await _open(port)
            except OSError:
                statuses["refused"] = statuses.get("refused", 0) + 1
                await asyncio.sleep(0.1)
                continue
            try:
                w.write(head)
                for at in range(0, len(body), piece):
                    if stop.is_set() or w.is_closing():
                        break
                    w.write(body[at : at + piece])
                    await w.drain()
                    await asyncio.sleep(per_client_s)
                else:
                    status = (await asyncio.wait_for(reader.readline(), 30)).split(b" ")[1:2]
                    key = status[0].decode() if status else "no answer"
                    statuses[key] = statuses.get(key, 0) + 1
            except (OSError, TimeoutError) as e:
                key = type(e).__name__  # the proxy may have answered before the body ended (413, 503)
                with contextlib.suppress(OSError, TimeoutError, IndexError):
                    key = (await asyncio.wait_for(reader.readline(), 1)).split(b" ")[1].decode()
                statuses[key] = statuses.get(key, 0) + 1
            finally:
                w.transport.abort()

    tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"body_mb": mb, "clients": clients, "link_mb_s": link_mb_s, "statuses": statuses}


async def hostile_counts(port: int, stop: asyncio.Event, mb: float = 2.0) -> dict[str, Any]:
    """A prompt of one letter (the slowest text to count exactly), sent and abandoned at once."""
    body = orjson.dumps({"model": BULK_MODEL, "messages": [{"role": "user", "content": "a" * int(mb * 1024 * 1024)}]})
    req = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    first = "not sent"
    with contextlib.suppress(OSError, TimeoutError, IndexError):  # one waits for its answer: is it served?
        reader, w = await _open(port)
        try:
            w.write(req + body)
            first = (await asyncio.wait_for(reader.readline(), 30)).split(b" ")[1].decode()
        finally:
            w.transport.abort()
    sent = 0
    while not stop.is_set():
        with contextlib.suppress(OSError):
            _, w = await _open(port)
            w.write(req + body)
            await w.drain()
            sent += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)
            w.transport.abort()
    return {"prompt_mb": mb, "first_answered": first, "sent_and_abandoned": sent}


ATTACKS: dict[str, Callable[[int, asyncio.Event], Awaitable[dict[str, Any]]]] = {
    "idle-connections": idle_connections,
    "slowloris": slowloris,
    "slow-readers": slow_readers,
    "big-bodies": big_bodies,
    "hostile-counts": hostile_counts,
}


async def _settle(url: str, within_s: float = 30.0) -> None:
    """Until the proxy answers a probe in under 100 ms again: what an attack left queued (bodies
    still being read, streams still open) is not charged to the next one."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        probes = await _probe(url, PROBE_EVERY_S)
        if probes.latencies and probes.latencies[0] < 100 and not probes.failures:
            return
        await asyncio.sleep(0.2)


async def _run_one(name: str, port: int, duration: float, bounds: Bounds, rss: Callable[[], float]) -> dict[str, Any]:
    await _settle(f"http://127.0.0.1:{port}")
    stop = asyncio.Event()
    before = rss()
    probe = asyncio.ensure_future(_probe_process(f"http://127.0.0.1:{port}", duration))
    attack = asyncio.ensure_future(ATTACKS[name](port, stop))
    peak = before
    while not probe.done():
        await asyncio.sleep(0.1)
        peak = max(peak, rss())
    stop.set()
    detail = await attack
    probes = await probe
    grew = round(peak - before, 1)
    p99 = Probes.p(probes.health, 0.99)
    failed = [
        why
        for why, bad in (
            (f"{len(probes.failures)} probes failed ({', '.join(sorted(set(probes.failures)))})", probes.failures),
            ("no probe was answered", not probes.latencies),
            (f"health p99 {p99} ms over {bounds.probe_p99_ms}", p99 is not None and p99 > bounds.probe_p99_ms),
            (f"RSS grew {grew} MB, over {bounds.rss_mb}", grew > bounds.rss_mb),
        )
        if bad
    ]
    return {
        "attack": name,
        "held": not failed,
        "why_not": failed,
        "probes": {"chat": len(probes.latencies), "health": len(probes.health), "failed": len(probes.failures)},
        "chat_ms": {q: Probes.p(probes.latencies, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "health_ms": {q: Probes.p(probes.health, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "rss_mb": {"before": round(before, 1), "peak": round(peak, 1), "grew": grew},
        "attacker": detail,
    }


def attack(c: Common, names: list[str], bounds: Bounds = Bounds()) -> dict[str, Any]:
    """Run `names` one after another against one proxy; print and write what each did to the probes."""
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SystemExit(f"edgeroute bench attack: unknown attack {', '.join(unknown)}; use {', '.join(ATTACKS)}")
    out: dict[str, Any] = {"scenario": "attack", "duration_s": c.duration, "bounds": bounds.__dict__, "attacks": []}
    with Stack(c.pin) as stack:
        quick = stack.upstream(name="mock")
        cfg = bench_config({"p0": f"http://127.0.0.1:{quick.port}/v1"})
        for model, mock in (
            (LONG_MODEL, stack.upstream("--tokens", "100000", "--tps", "200", name="long-mock")),
            (BULK_MODEL, stack.upstream(name="bulk-mock")),
        ):
            cfg["providers"][model] = {"kind": "openai", "base_url": f"http://127.0.0.1:{mock.port}/v1", "api_key": "k"}
            cfg["deployments"][model] = {"provider": model, "model": "gpt-4o-mini"}
            cfg["models"][model] = {"deployments": [model]}
        proxy, _ = stack.proxy(cfg)
        raise_open_file_limit()  # the attacker's own connections
        for name in names:
            say(f"attack {name}: {c.duration:g} s")
            profile = None if c.profile is None else str(Path(c.profile).with_stem(f"{Path(c.profile).stem}-{name}"))
            spy = stack.profiler(proxy, c.duration, profile)
            cpu = proxy.cpu_seconds()
            result = asyncio.run(_run_one(name, proxy.port, c.duration, bounds, proxy.rss_mb))
            # What the attack cost the proxy's cores, the settling before it included (CPU seconds).
            result["proxy_cpu_s"] = round(proxy.cpu_seconds() - cpu, 2)
            if spy is not None:
                spy.wait(30)
            if not proxy.alive():
                result["held"] = False
                result["why_not"].append("the proxy exited")
            out["attacks"].append(result)
            verdict = "held" if result["held"] else "FAILED: " + "; ".join(result["why_not"])
            chat, health = result["chat_ms"], result["health_ms"]
            say(f"  health p50 {health['p50']} ms, p99 {health['p99']} ms; chat p50 {chat['p50']} ms, "
                f"p99 {chat['p99']} ms; RSS +{result['rss_mb']['grew']} MB; proxy CPU {result['proxy_cpu_s']} s; "
                f"{verdict}")  # fmt: skip
            if not proxy.alive():
                break
    out["held"] = all(a["held"] for a in out["attacks"]) and len(out["attacks"]) == len(names)
    write_result(c, "attack", [], out)
    return out


if __name__ == "__main__":  # the probe process: `--probe URL SECONDS`, its results as JSON on stdout
    if sys.argv[1:2] != ["--probe"] or len(sys.argv) != 4:
        raise SystemExit(
            "usage: python -m edgeroute.bench.attacks --probe URL SECONDS (run by `edgeroute bench attack`)"
        )
    result = asyncio.run(_probe(sys.argv[2], float(sys.argv[3])))
    sys.stdout.buffer.write(
        orjson.dumps({"latencies": result.latencies, "health": result.health, "failures": result.failures})
    )
