"""A key's requests in flight at once (`limits.max_parallel`), end to end with the official SDKs:
streams past the cap get a 429 in the API's own format, a slot comes back when its stream ends,
its client goes away or its upstream fails, other keys are untouched, and two instances on one
Redis (or the workers of one `serve --workers N`) hold the cap together, getting back the
slots of an instance killed with -9 within the lease's TTL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edgeroute.config import SharedState
from edgeroute.leases import LEASE_S, RENEW_S, RedisLeases
from tests.conftest import eventually
from tests.dispatch_support import HELLO, StartProxy, answer, chunk, sse_response
from tests.dispatch_support import upstreams as upstreams  # a fixture
from tests.governance_support import call
from tests.scale.support import Spawn, metric
from tests.scale.support import spawn as spawn  # a fixture
from tests.test_cost_support import require_redis

CAPPED, OTHER, ROOT = "tok-capped-7f3a", "tok-other-91c2", "tok-root-5be0"


class HeldStreams:
    """An OpenAI-compatible upstream whose streams send their first chunk, then stay open until
    `release` is set; a request that does not stream is answered at once. `fail` answers 500."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.open = 0
        self.fail = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if self.fail:
            err = {"error": {"message": "upstream broke", "type": "server_error", "code": None}}
            return web.Response(status=500, body=orjson.dumps(err), content_type="application/json")
        if not body.get("stream"):
            return answer()
        r = await sse_response(request)
        self.open += 1
        try:
            await r.write(chunk("hel"))
            await self.release.wait()
            await r.write(chunk("lo"))
            done = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            await r.write(b"data: " + orjson.dumps(done) + b"\n\ndata: [DONE]\n\n")
        finally:
            self.open -= 1
        return r


def _config(cfg: dict[str, Any], cap: int) -> dict[str, Any]:
    cfg["keys"] = {
        "capped": {"token": CAPPED, "team": "research", "limits": {"max_parallel": cap}},
        "other": {"token": OTHER},
        "root": {"token": ROOT, "role": "admin"},
    }
    cfg.setdefault("server", {})["metrics_public"] = True  # Prometheus scrapes it without a key here
    return cfg


def _client(url: str, token: str = CAPPED) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0)


async def _open_stream(url: str, token: str = CAPPED) -> openai.AsyncStream[Any]:
    """A stream the proxy has admitted and started (its first chunk read)."""
    stream = await _client(url, token).chat.completions.create(model="m", messages=HELLO, stream=True)
    first = await stream.__aiter__().__anext__()
    assert first.choices[0].delta.content == "hel"
    return stream


async def _finish(stream: openai.AsyncStream[Any]) -> str:
    return "".join([c.choices[0].delta.content or "" async for c in stream])


async def _ask(url: str, token: str = CAPPED) -> Any:
    return await _client(url, token).chat.completions.create(model="m", messages=HELLO)


def _assert_refused(e: openai.RateLimitError) -> None:
    assert e.status_code == 429
    assert e.code == "parallel_limit"
    assert e.body is not None and e.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert "'capped'" in e.message and "limit is 3 at once" in e.message, e.message
    assert CAPPED not in e.message and CAPPED not in str(e.response.headers)
    assert e.response.headers["retry-after"] == "1"
    assert e.response.headers["x-request-id"]


async def test_streams_past_the_cap_are_refused_until_one_ends(upstreams: Any, start_proxy: StartProxy) -> None:
    up = HeldStreams()
    proxy = await start_proxy(_config(await upstreams(up.handle), cap=3))
    held = [await _open_stream(proxy.url) for _ in range(3)]
    # Two more at once, streamed or not: each refused, none reaches the upstream.
    refused = await asyncio.gather(
        _client(proxy.url).chat.completions.create(model="m", messages=HELLO, stream=True),
        _ask(proxy.url),
        return_exceptions=True,
    )
    for e in refused:
        assert isinstance(e, openai.RateLimitError), e
        _assert_refused(e)
    assert up.open == 3
    status, report = await call("GET", proxy.url + "/admin/budgets", ROOT)
    assert status == 200, report
    rows = {(r["scope"], r["name"]): r for r in report["rate_limits"]}
    assert (rows[("key", "capped")]["max_parallel"], rows[("key", "capped")]["in_flight"]) == (3, 3)
    # The Messages API refuses in its own format.
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=CAPPED, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as ei:
        await claude.messages.create(model="m", max_tokens=16, messages=HELLO)
    assert ei.value.body["type"] == "error" and ei.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "max_parallel" in ei.value.message and ei.value.response.headers["retry-after"] == "1"
    # Another key is not held back by this one's cap.
    other = await _open_stream(proxy.url, OTHER)
    assert (await _ask(proxy.url, OTHER)).choices[0].message.content == "hi there"
    # The streams end: the key's slots are back.
    up.release.set()
    assert [await _finish(s) for s in [*held, other]] == ["lo"] * 4
    again = [await _open_stream(proxy.url) for _ in range(3)]
    assert [await _finish(s) for s in again] == ["lo"] * 3
    # The refusals are counted by error class, and recorded with their key.
    got = await metric(proxy.url, "edgeroute_request_errors_total", {"route": "m", "error_class": "parallel_limit"})
    assert got == 3.0
    refusals = [r for r in proxy.recorder.records if r.error_class == "parallel_limit"]
    assert [(r.status, r.key, r.outcome) for r in refusals] == [(429, "capped", "rate_limited")] * 3


async def test_a_client_that_goes_away_gives_its_slot_back(upstreams: Any, start_proxy: StartProxy) -> None:
    up = HeldStreams()
    proxy = await start_proxy(_config(await upstreams(up.handle), cap=1))
    stream = await _open_stream(proxy.url)
    with pytest.raises(openai.RateLimitError):
        await _ask(proxy.url)
    await stream.close()  # the client hangs up mid-stream

    async def admitted() -> bool:
        try:
            return (await _ask(proxy.url)).choices[0].message.content == "hi there"
        except openai.RateLimitError:
            return False

    await eventually(admitted, "the slot of a client that went away")
    assert up.open == 0  # the upstream call was cancelled with it
    assert [r.outcome for r in proxy.recorder.records if r.stream] == ["client_gone"]


async def test_an_upstream_failure_gives_its_slot_back(upstreams: Any, start_proxy: StartProxy) -> None:
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=1)
    proxy = await start_proxy(cfg)
    up.fail = True
    for _ in range(3):  # each failed request's slot is back for the next
        with pytest.raises(openai.APIStatusError) as ei:
            await _client(proxy.url).chat.completions.create(model="m", messages=HELLO, stream=True)
        assert ei.value.status_code != 429, ei.value
    up.fail = False
    stream = await _open_stream(proxy.url)  # the cap still holds: one slot, now taken
    with pytest.raises(openai.RateLimitError):
        await _ask(proxy.url)
    up.release.set()
    assert await _finish(stream) == "lo"


async def test_a_stream_cut_by_its_upstream_gives_its_slot_back(upstreams: Any, start_proxy: StartProxy) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            return answer()
        r = await sse_response(request)
        await r.write(chunk("hel"))
        assert request.transport is not None
        request.transport.close()  # the upstream goes away mid-stream
        return r

    proxy = await start_proxy(_config(await upstreams(cut), cap=1))
    for _ in range(2):
        stream = await _open_stream(proxy.url)
        with pytest.raises(openai.APIError):
            await _finish(stream)
    assert (await _ask(proxy.url)).choices[0].message.content == "hi there"


@pytest.fixture
async def shared() -> AsyncIterator[SharedState]:
    url = require_redis()
    cfg = SharedState(redis_url=url, prefix=f"edgeroute-par-{os.getpid()}-{os.urandom(4).hex()}", timeout_ms=2000)
    yield cfg
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    async for key in client.scan_iter(match=cfg.prefix + ":*"):
        await client.delete(key)
    await client.aclose()


async def _leases(cfg: SharedState, key: str) -> int:
    store = RedisLeases(cfg, "par")
    try:
        return await store.count(key)
    finally:
        await store.close()


async def test_two_instances_on_one_redis_hold_the_cap_together(
    upstreams: Any, start_proxy: StartProxy, shared: SharedState
) -> None:
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=3)
    cfg["shared_state"] = shared.model_dump()
    p1, p2 = await start_proxy(cfg), await start_proxy(cfg)
    held = [await _open_stream(p.url) for p in (p1, p2, p1)]
    for p in (p1, p2):  # each alone holds fewer than 3: the fleet holds 3
        with pytest.raises(openai.RateLimitError) as ei:
            await _ask(p.url)
        _assert_refused(ei.value)
    assert await _leases(shared, "capped") == 3
    assert (await _ask(p2.url, OTHER)).choices[0].message.content == "hi there"
    up.release.set()
    assert [await _finish(s) for s in held] == ["lo"] * 3

    async def none_left() -> bool:  # given back off the request path
        return await _leases(shared, "capped") == 0

    await eventually(none_left, "leases left behind")
    assert (await _ask(p2.url)).choices[0].message.content == "hi there"


async def test_redis_down_follows_on_unavailable(upstreams: Any, start_proxy: StartProxy) -> None:
    from tests.serve_support import free_port

    up = HeldStreams()
    base = await upstreams(up.handle)
    dead = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout_ms": 200}
    # closed: refused with the 503 budgets give while the store cannot answer.
    closed = await start_proxy(_config({**base, "shared_state": {**dead, "on_unavailable": "closed"}}, cap=1))
    with pytest.raises(openai.APIStatusError) as ei:
        await _ask(closed.url)
    assert ei.value.status_code == 503 and ei.value.code == "budget_store_unavailable"
    # open: this instance's own count still holds the cap.
    opened = await start_proxy(_config({**base, "shared_state": dead}, cap=1))
    stream = await _open_stream(opened.url)
    with pytest.raises(openai.RateLimitError):
        await _ask(opened.url)
    up.release.set()
    assert await _finish(stream) == "lo"
    assert (await _ask(opened.url)).choices[0].message.content == "hi there"


async def test_a_redis_that_does_not_answer_is_not_asked_again_for_each_capped_request(
    upstreams: Any, start_proxy: StartProxy
) -> None:
    """Once Redis has failed (on_unavailable: open), a capped key's requests go on this
    instance's count without asking it again for a second: each asked, and waited out the
    timeout against a Redis that accepts and never answers."""
    received: list[bytes] = []

    async def blackhole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            received.append(data)
        writer.close()

    hole = await asyncio.start_server(blackhole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=2)
    cfg["shared_state"] = {"redis_url": f"redis://127.0.0.1:{port}/0", "timeout_ms": 200, "prefix": "bh"}
    proxy = await start_proxy(cfg)
    await _ask(proxy.url)  # Redis is found not to answer
    before = sum(d.count(b"bh:par:") for d in received)
    for _ in range(4):
        await _ask(proxy.url)
    # Not asked again within the second (once more at most, should the four take longer): each
    # request asked before, two of its keys named every time.
    assert sum(d.count(b"bh:par:") for d in received) - before <= 2
    hole.close()


async def test_a_killed_instance_gives_its_slots_back_within_the_lease(
    upstreams: Any, spawn: Spawn, shared: SharedState
) -> None:
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=2)
    cfg["shared_state"] = shared.model_dump()
    doomed, survivor = await spawn(cfg, name="doomed"), await spawn(cfg, name="survivor")
    held = [await _open_stream(doomed.url) for _ in range(2)]
    with pytest.raises(openai.RateLimitError):
        await _ask(survivor.url)
    os.kill(doomed.proc.pid, signal.SIGKILL)  # no chance to give anything back
    killed = time.monotonic()
    for s in held:
        with pytest.raises(openai.APIError):
            await _finish(s)
    with pytest.raises(openai.RateLimitError):  # its leases outlive it, for a while
        await _ask(survivor.url)

    refused_at: list[float] = []

    async def admitted() -> bool:
        sent = time.monotonic()
        try:
            return (await _ask(survivor.url)).choices[0].message.content == "hi there"
        except openai.RateLimitError:
            refused_at.append(sent)
            return False

    await eventually(admitted, "the dead instance's slots", within=LEASE_S + 10, every=0.25)
    # Judged by when each request was sent, not by when the wait saw one through (a slow host
    # delays that): none sent past the leases' end (renewed at most until the kill) was refused.
    late = [t - killed for t in refused_at if t - killed > LEASE_S + 0.5]
    assert not late, f"refused {late} s after the kill: the dead instance's slots outlived its leases"


async def test_the_workers_of_one_serve_hold_the_cap_together(upstreams: Any, spawn: Spawn) -> None:
    up = HeldStreams()
    inst = await spawn(_config(await upstreams(up.handle), cap=3), "--workers", "2")
    # Connections are spread over the workers by the kernel: enough streams that both take some.
    held = [await _open_stream(inst.url) for _ in range(3)]
    for _ in range(6):
        with pytest.raises(openai.RateLimitError) as ei:
            await _ask(inst.url)
        _assert_refused(ei.value)
    up.release.set()
    assert [await _finish(s) for s in held] == ["lo"] * 3
    assert (await _ask(inst.url)).choices[0].message.content == "hi there"


async def test_managed_keys_take_max_parallel_from_the_api_and_the_cli(upstreams: Any, start_proxy: StartProxy) -> None:
    import json
    import subprocess
    import sys

    up = HeldStreams()
    cfg = await upstreams(up.handle)
    cfg["keys"] = {"root": {"token": "tok-root", "role": "admin"}}
    cfg["governance"] = {"managed_keys": True, "key_poll_interval": 0.2}
    proxy = await start_proxy(cfg)
    url = proxy.url
    status, boss = await call("POST", url + "/admin/keys", "tok-root", json={"role": "admin", "max_parallel": 2})
    assert status == 201 and boss["max_parallel"] == 2, boss
    assert (await call("GET", url + f"/admin/keys/{boss['id']}", "tok-root"))[1]["max_parallel"] == 2
    # A key cannot give more than it has; the keys it makes share its cap.
    for fields in ({}, {"max_parallel": 3}):
        status, err = await call("POST", url + "/admin/keys", boss["secret"], json=fields)
        assert status == 403 and "max_parallel" in err["error"]["message"], err
    status, err = await call("POST", url + "/admin/keys", "tok-root", json={"max_parallel": 0})
    assert status == 400 and "max_parallel" in err["error"]["message"], err
    status, made = await call("POST", url + "/admin/keys", boss["secret"], json={"max_parallel": 2})
    assert status == 201, made
    held = [await _open_stream(url, boss["secret"]), await _open_stream(url, made["secret"])]
    with pytest.raises(openai.RateLimitError) as ei:
        await _ask(url, made["secret"])
    assert f"key '{boss['id']}'" in ei.value.message and boss["secret"] not in ei.value.message
    # Raised on the maker: the next request passes once the keys are read again.
    status, _ = await call("PATCH", url + f"/admin/keys/{boss['id']}", "tok-root", json={"max_parallel": 3})
    assert status == 200

    async def raised() -> bool:
        try:
            return (await _ask(url, made["secret"])).choices[0].message.content == "hi there"
        except openai.RateLimitError:
            return False

    await eventually(raised, "the raised cap")
    up.release.set()
    assert [await _finish(s) for s in held] == ["lo"] * 2
    # `edgeroute keys create --max-parallel`, as an operator runs it.
    env = {**os.environ, "EDGEROUTE_ADMIN_KEY": "tok-root", "EDGEROUTE_URL": url}
    argv = [sys.executable, "-m", "edgeroute", "keys", "create", "--max-parallel", "4"]
    out = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["max_parallel"] == 4


def test_check_validates_max_parallel(tmp_path: Any) -> None:
    import subprocess
    import sys

    import yaml

    def check(extra: dict[str, Any]) -> str:
        cfg = {
            "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
            "deployments": {"d": {"provider": "p", "model": "gpt-4o-mini"}},
            "models": {"m": {"deployments": ["d"]}},
            **extra,
        }
        path = tmp_path / "edge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "edgeroute", "check", str(path)], capture_output=True, text=True)
        return f"{r.returncode}: {r.stderr}"

    ok = check(
        {"keys": {"k": {"token": "t", "limits": {"max_parallel": 2}}}, "rate_limits": {"per_key": {"max_parallel": 4}}}
    )
    assert ok.startswith("0: "), ok
    zero = check({"keys": {"k": {"token": "t", "limits": {"max_parallel": 0}}}})
    assert zero.startswith("1: ") and "keys.k.limits.max_parallel" in zero, zero
    on_model = check({"rate_limits": {"models": {"m": {"max_parallel": 2}}}})
    assert on_model.startswith("1: ") and "rate_limits.models.m.max_parallel: only keys have max_parallel" in on_model
    on_dep = check({"rate_limits": {"deployments": {"d": {"max_parallel": 2}}}})
    assert "or max_concurrency on the deployment" in on_dep, on_dep


async def test_per_key_caps_each_key_without_limits_of_its_own(upstreams: Any, start_proxy: StartProxy) -> None:
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=3)
    cfg["rate_limits"] = {"per_key": {"max_parallel": 1}}
    proxy = await start_proxy(cfg)
    held = [await _open_stream(proxy.url, OTHER)]
    with pytest.raises(openai.RateLimitError) as ei:
        await _ask(proxy.url, OTHER)
    assert "key 'other'" in ei.value.message and "limit is 1 at once" in ei.value.message
    held += [await _open_stream(proxy.url) for _ in range(3)]  # its own limits, not per_key's
    up.release.set()
    assert [await _finish(s) for s in held] == ["lo"] * 4


async def test_a_cap_of_its_own_keeps_a_key_under_per_key_rate_limits(upstreams: Any, start_proxy: StartProxy) -> None:
    """A key whose `limits` set only `max_parallel` stays under `per_key`'s rpm: a cap of its own
    took it out of every per-key rate limit (`keys create --max-parallel 5` did the same)."""
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=5)
    cfg["rate_limits"] = {"per_key": {"rpm": 2}}
    proxy = await start_proxy(cfg)
    for _ in range(2):
        await _ask(proxy.url)
    with pytest.raises(openai.RateLimitError) as ei:
        await _ask(proxy.url)
    assert "max_parallel" not in ei.value.message  # the rpm bucket refused it, not the cap


async def test_with_redis_a_refusal_at_the_cap_takes_nothing_from_the_rate_limit(
    upstreams: Any, start_proxy: StartProxy, shared: SharedState
) -> None:
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=1)
    cfg["keys"]["capped"]["limits"]["rpm"] = 3
    cfg["shared_state"] = shared.model_dump()
    proxy = await start_proxy(cfg)
    stream = await _open_stream(proxy.url)  # 1 of 3 this minute
    for _ in range(5):
        with pytest.raises(openai.RateLimitError) as ei:
            await _ask(proxy.url)
        assert ei.value.code == "parallel_limit"
    up.release.set()
    assert await _finish(stream) == "lo"
    for _ in range(2):  # the refusals took none of the minute's requests
        assert (await _ask(proxy.url)).choices[0].message.content == "hi there"
    with pytest.raises(openai.RateLimitError) as ei:
        await _ask(proxy.url)
    assert ei.value.code == "rate_limit_exceeded"

    async def none_left() -> bool:  # nor does a request the rate limit refused hold a slot
        return await _leases(shared, "capped") == 0

    await eventually(none_left, "a lease left by a refused request")


async def _two_instances(upstreams: Any, spawn: Spawn, redis_url: str) -> tuple[HeldStreams, SharedState, Any, Any]:
    """A holder and another instance sharing `redis_url`, a key capped at 2, streams held open."""
    up = HeldStreams()
    cfg = _config(await upstreams(up.handle), cap=2)
    shared = SharedState(redis_url=redis_url, prefix="edge", timeout_ms=500)
    cfg["shared_state"] = shared.model_dump()
    holder, other = await spawn(cfg, name="holder"), await spawn(cfg, name="other")
    return up, shared, holder, other


async def _held_to_the_cap_again(url: str, shared: SharedState, up: HeldStreams, held: list[Any], what: str) -> None:
    """The instance at `url` refuses the key within `RENEW_S` (the fleet counts the two `held`
    streams again); once they end, no lease is left behind."""

    async def refused() -> bool:
        try:
            await _ask(url)  # answered at once: it holds no slot after
        except openai.RateLimitError as e:
            assert e.code == "parallel_limit" and "limit is 2 at once" in e.message, e.message
            return True
        return False

    await eventually(refused, what, within=RENEW_S + 5, every=0.25)
    assert await _leases(shared, "capped") == 2
    up.release.set()
    assert [await _finish(s) for s in held] == ["lo"] * 2

    async def none_left() -> bool:
        return await _leases(shared, "capped") == 0

    await eventually(none_left, "leases left behind")


@pytest.mark.parametrize("empty", ["restart", "flushall"])
async def test_slots_held_when_redis_comes_back_empty_count_again(
    upstreams: Any, spawn: Spawn, tmp_path: Any, empty: str
) -> None:
    """Redis restarted empty (or flushed) while an instance holds a key's slots: the renewal
    leases them again, so the other instance is held to the cap again within `RENEW_S`. It
    renewed only the leases Redis still had: the fleet counted none of them until they ended,
    and the other instance admitted the cap again (4 in flight under a cap of 2)."""
    import redis.asyncio as aioredis

    from tests.test_cost_support import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        up, shared, holder, other = await _two_instances(upstreams, spawn, server.url)
        held = [await _open_stream(holder.url) for _ in range(2)]
        with pytest.raises(openai.RateLimitError):
            await _ask(other.url)
        if empty == "restart":
            server.stop()
            server.start()  # the same port, nothing in it
        else:
            client = aioredis.Redis.from_url(server.url)
            await client.flushall()
            await client.aclose()

        await _held_to_the_cap_again(other.url, shared, up, held, "the held slots counted again")
    finally:
        server.stop()


async def test_slots_taken_while_redis_was_down_count_once_it_is_back(
    upstreams: Any, spawn: Spawn, tmp_path: Any
) -> None:
    """Streams admitted on one instance's count while Redis was stopped (`on_unavailable:
    open`) are leased once it answers again, so the other instance is held to the cap again
    within `RENEW_S`. They were never leased: the fleet did not count them until they ended,
    and the other instance admitted the cap again (4 in flight under a cap of 2)."""
    from tests.test_cost_support import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        up, shared, holder, other = await _two_instances(upstreams, spawn, server.url)
        server.stop()
        held = [await _open_stream(holder.url) for _ in range(2)]  # this instance's count alone
        with pytest.raises(openai.RateLimitError):
            await _ask(holder.url)
        server.start()  # the same port

        await _held_to_the_cap_again(other.url, shared, up, held, "the slots taken while Redis was down")
        assert (await _ask(other.url)).choices[0].message.content == "hi there"
    finally:
        server.stop()
