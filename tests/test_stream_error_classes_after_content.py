"""An upstream's own error event after content keeps its class: in the request's record, the
error metric and the deployment's health.

Every such event was recorded `upstream_error` and charged to the deployment's health as a
broken stream: a mid-stream rate limit counted as a crash with no cool-down (the next requests
went straight back to the limited deployment), the request's own error (too long a context)
counted against the deployment, and none showed in `edgeroute_request_errors_total` (its
status was the stream's 200). Now a rate limit cools the deployment down as a 429 does, the
request's own error is not the deployment's, and a server error is a broken stream as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from tests.conftest import Proxy, ServeRoutes, eventually
from tests.dispatch_support import recorded
from tests.scale.support import metric
from tests.test_answers_in_200_that_are_not import Hostile, _chunk, _deployments
from tests.test_answers_in_200_that_are_not import _proxy as _two_deployments
from tests.test_native_stream_error_classes import _openai_stream

StartProxy = Callable[[dict[str, Any]], Awaitable[Proxy]]
HALF = _chunk({"role": "assistant", "content": "half"})


def _error_event(etype: str, code: str | int | None) -> bytes:
    return b"data: " + orjson.dumps({"error": {"message": f"the upstream said {etype}", "type": etype, "code": code}})


# (the event's type, its code, the record's error class, failures charged, a cool-down)
CLASSES = [
    ("rate_limit_error", "rate_limit_exceeded", "rate_limited", 1, True),
    ("invalid_request_error", "context_length_exceeded", "context_window", 0, False),
    ("invalid_request_error", None, "client_error", 0, False),
    ("server_error", None, "upstream_error", 1, False),
]


@pytest.mark.parametrize(
    ("etype", "code", "error_class", "failures", "cools"),
    CLASSES,
    ids=["rate-limit", "context-length", "invalid-request", "server-error"],
)
async def test_an_error_event_after_content_keeps_its_class(
    start_proxy: StartProxy,
    serve_routes: ServeRoutes,
    etype: str,
    code: str | None,
    error_class: str,
    failures: int,
    cools: bool,
) -> None:
    upstream = Hostile([HALF, _error_event(etype, code) + b"\n\n"])
    proxy = await _two_deployments(start_proxy, serve_routes, upstream, Hostile([]))
    text, error = await _openai_stream(proxy)
    assert text == "half"
    assert error is not None and (error.type, error.code) == (etype, code), error  # in the upstream's words
    rec = await recorded(proxy)
    assert (rec.status, rec.outcome, rec.error_class) == (200, "stream_interrupted", error_class), rec
    health = (await _deployments(proxy))["d-a"]
    assert health["failures"] == failures and health["circuit"] == "closed", health
    assert (health["cooldown_ms"] > 0) is cools, health

    async def counted() -> float | None:
        return await metric(proxy.url, "edgeroute_request_errors_total", {"route": "m", "error_class": error_class})

    assert await eventually(counted, f"the {error_class} stream counted in the request-error metric") == 1
