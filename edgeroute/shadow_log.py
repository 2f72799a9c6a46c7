"""The shadow log: each mirrored pair (the client's answer and the shadow's, their costs and
latencies) as one JSON line, ready for offline comparison; answers redacted as the request
log stores them."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from edgeroute import redact
from edgeroute.accounting import RequestRecord


class ShadowLog:
    """Appends JSON lines to a file from a thread (or keeps the last pairs in memory)."""

    def __init__(self, path: Path | None, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self.pairs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, pair: dict[str, Any]) -> None:
        with self._lock:
            self.pairs.append(pair)
            del self.pairs[: -self.keep]
            if self.path is not None:
                with self.path.open("ab") as f:
                    f.write(orjson.dumps(pair) + b"\n")


SHADOW_LOG = web.AppKey("shadow_log", ShadowLog)


def pair_record(
    primary: RequestRecord, primary_answer: str | None, shadow: RequestRecord, shadow_answer: str | None
) -> dict[str, Any]:
    def side(rec: RequestRecord, answer: str | None) -> dict[str, Any]:
        return {
            "route": rec.route,
            "deployment": rec.deployment,
            "status": rec.status,
            "cost_usd": rec.cost_usd,
            "latency_ms": round(rec.latency_ms, 3),
            "completion_tokens": rec.usage.completion_tokens if rec.usage else None,
            "answer": answer,
        }

    return {
        "ts": time.time(),
        "request_id": primary.request_id,
        "primary": side(primary, primary_answer),
        "shadow": side(shadow, shadow_answer),
    }


def redacted(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair with credentials in its answers replaced, as the request log stores answers (a
    model repeats what it was sent: a key pasted into a prompt, say)."""
    for side in (pair["primary"], pair["shadow"]):
        if side["answer"] is not None:
            side["answer"] = redact.text(side["answer"])
    return pair
