"""Small HTTP helpers shared by the governance handlers: JSON in and out, query checks."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import orjson
from aiohttp import web

from edgeroute import _core
from edgeroute.errors import ProxyError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


# As for a request body (`request_input.MAX_JSON_DEPTH`): no config or key nests this deep, and
# writing one that does back (a key's metadata as JSON, a deployment change as YAML) failed.
MAX_DEPTH = 128


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (an empty body is `{}`); 400 otherwise."""
    raw = await request.read()
    if _core.Router.nesting_over(raw, MAX_DEPTH):
        raise ProxyError(400, f"The body is nested more than {MAX_DEPTH} levels deep.")
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ProxyError(400, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "The body must be a JSON object.")
    return body


def only_params(request: web.Request, allowed: set[str]) -> None:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise ProxyError(400, f"Unknown parameter '{unknown[0]}'.", param=unknown[0])


def text_param(raw: str, name: str) -> str:
    """A text parameter (a query filter, a path's id) as the stores take it: PostgreSQL refuses
    NUL in text (a 500 and a traceback per call, where SQLite found nothing), and no name is
    longer than 256 characters. 400 naming the parameter, on every backend alike."""
    if len(raw) > 256 or "\x00" in raw:
        raise ProxyError(
            400, f"Invalid parameter {name}: longer than 256 characters or with a NUL", code="invalid_parameter",
            param=name,
        )  # fmt: skip
    return raw


def parse_since(raw: str) -> float:
    """Epoch seconds, or a span back from now (`15m`, `24h`, `7d`; further back than 1970 is 1970).
    `nan`, `inf` and times before 1970 or past the year 5000 are refused: `since=nan` matched
    nothing and answered an empty audit log, which an admin reads as nothing having happened."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd])", raw.strip())  # ASCII digits: `\d` takes "٣"
    if m:
        return max(0.0, time.time() - float(m.group(1)) * _UNITS[m.group(2)])
    try:
        t = float(raw)
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and 0 <= t < 1e11):
        raise ProxyError(400, "'since' must be epoch seconds or a span such as 15m, 24h, 7d.", param="since")
    return t
