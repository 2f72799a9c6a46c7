"""Shadow traffic: mirror a sample of a route's requests to a candidate model, off the
hot path, and record both answers and both costs. The shadow answer is never returned
to the client, and a shadow failure never affects the client's request.

Each pair becomes one JSON line in the shadow log (and the shadow request's spend goes
to the ledger like any other, marked `shadow`), ready for offline comparison.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from edgeroute.accounting import RequestRecord

log = logging.getLogger("edgeroute.shadow")


def answer_text(body: bytes) -> str | None:
    """The assistant text of an OpenAI chat completion, if any."""
    try:
        obj = orjson.loads(body)
        content = obj["choices"][0]["message"].get("content")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return content if isinstance(content, str) else None


def shadow_body(body: bytes, model: str) -> bytes:
    """The client's body for `model`, as a non-streaming request."""
    obj: dict[str, Any] = orjson.loads(body)
    obj["model"] = model
    obj.pop("stream", None)
    obj.pop("stream_options", None)
    return orjson.dumps(obj)


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


def sampled(percent: float, rng: random.Random = random._inst) -> bool:  # type: ignore[attr-defined]
    return percent > 0 and rng.random() * 100 < percent


def pair_record(primary: RequestRecord, primary_answer: str | None, shadow: RequestRecord, shadow_answer: str | None) -> dict[str, Any]:
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


def spawn(tasks: set[asyncio.Task[None]], coro: Any) -> None:
    task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
