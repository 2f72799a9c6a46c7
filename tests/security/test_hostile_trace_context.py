"""A hostile `traceparent` / `tracestate` from a client, with tracing on: never a 500, and
what reaches the upstream is a well-formed W3C context or nothing.

A traceparent of a future version may carry more fields after the flags, and it was
forwarded as the client wrote it (up to the header limit, 8 KB of the client's text in every
upstream call) when not sampled. W3C trace context: a vendor that parses a higher version
propagates version 00. A tracestate is ASCII, at most 32 list members of `key=value`;
one with other characters was forwarded as long as Python found it printable.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from edgeroute import config as config_mod
from edgeroute.accounting import MemoryRecorder
from edgeroute.server import create_app
from tests.conftest import ProxyTestServer, simple_config

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
W3C = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def traced(start_upstream: Any) -> AsyncIterator[Callable[[dict[str, str]], Awaitable[dict[str, str]]]]:
    """A proxy with tracing on, sampling nothing of its own (a client's sampled flag still
    samples); `send(headers)` makes one request and returns the headers the upstream got."""
    up = await start_upstream(record=True)
    cfg = simple_config({"a": up})
    # The collector's address is unreachable: spans are dropped, never waited for.
    cfg["tracing"] = {"enabled": True, "sample_ratio": 0.0, "endpoint": "http://127.0.0.1:9/v1/traces",
                      "flush_interval_s": 0.1, "timeout_s": 1}  # fmt: skip
    app = create_app(config_mod.parse(cfg, "test.yaml"), "test.yaml", MemoryRecorder())
    server = ProxyTestServer(app)
    await server.start_server()
    session = aiohttp.ClientSession()

    async def send(headers: dict[str, str]) -> dict[str, str]:
        before = len(up.options.requests)
        async with session.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=BODY, headers=headers) as r:
            assert r.status == 200, (headers, await r.text())
        assert len(up.options.requests) == before + 1
        return {k.lower(): v for k, v in up.options.requests[-1]["headers"].items()}

    yield send
    await session.close()
    await server.close()


async def test_a_future_version_traceparent_goes_upstream_as_version_00(traced: Any) -> None:
    for flags in ("00", "01"):
        junk = f"cc-{TRACE}-{PARENT}-{flags}-" + "x" * 6000
        sent = (await traced({"traceparent": junk})).get("traceparent")
        assert sent is not None and W3C.fullmatch(sent), sent[:100] if sent else sent
        assert sent.split("-")[1] == TRACE  # the client's trace continues
        if flags == "00":  # not sampled: the client's own span is the parent upstream
            assert sent == f"00-{TRACE}-{PARENT}-00"


async def test_malformed_traceparents_are_ignored_never_a_500(traced: Any) -> None:
    for bad in (
        "",
        "-" * 60,
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-zz",
        "00-" + "a" * 8000,
        f"00-{TRACE}-{PARENT}-01".replace("-", "\u2010"),
    ):
        sent = (await traced({"traceparent": bad})).get("traceparent")
        assert sent is None or W3C.fullmatch(sent), (bad[:80], sent)
        assert sent is None or bad == "" or sent != bad


async def test_a_tracestate_goes_upstream_only_when_well_formed(traced: Any) -> None:
    parent = f"00-{TRACE}-{PARENT}-01"
    good = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert (await traced({"traceparent": parent, "tracestate": good}))["tracestate"] == good
    for bad in (
        "v=caf\u00e9",  # not ASCII
        "v=\u202eevil",
        ",".join(f"k{i}=v" for i in range(33)),  # more than 32 members
        "a" * 600,  # over 512 characters
        "no-equals-sign",
        "Upper=v",  # keys are lower case
        "k=v,k2",
    ):
        sent = await traced({"traceparent": parent, "tracestate": bad})
        assert "tracestate" not in sent, (bad[:60], sent.get("tracestate"))
