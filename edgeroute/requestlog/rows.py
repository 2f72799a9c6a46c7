"""A `RequestRecord` as a row of the `requests` table (built in the writer thread).

Ids and numbers, the explanation (tags, reasons) and the attempt timeline go in as they
are; an attempt's error text (which may quote an upstream's answer, and the prompt in it) is
cut at 500 characters and stored as the request's content policy allows (`content.error_text`).
Prompts and answers are stored only where `log_content` asks for them (`content.py`).
"""

from __future__ import annotations

from typing import Any

import orjson

from edgeroute import redact
from edgeroute.accounting import RequestRecord
from edgeroute.requestlog import content

COLUMNS = (
    "id", "correlation_id", "ts", "key_id", "team", "user_id", "model", "route", "rule", "policy", "task",
    "difficulty", "variant", "deployment", "provider", "stream", "status", "outcome", "error_class",
    "latency_ms", "ttft_ms", "queue_ms", "prompt_tokens", "completion_tokens", "tokens_estimated", "cost_usd",
    "baseline_cost_usd", "cache", "attempts", "detail", "content",
)  # fmt: skip


def _error_class(rec: RequestRecord) -> str | None:
    if rec.error_class is not None or rec.status == 200:
        return rec.error_class
    return rec.outcome if rec.outcome not in ("ok", "pending") else f"status_{rec.status}"


def attempt_timeline(rec: RequestRecord) -> list[dict[str, Any]]:
    return [
        {
            "deployment": a.deployment,
            "provider": a.provider,
            "kind": a.kind,
            "outcome": a.outcome,
            "status": a.status,
            "start_ms": round((a.started_at - rec.started_at) * 1000, 3) if a.started_at else None,
            "latency_ms": round(a.latency_ms, 3),
            "ttft_ms": None if a.ttft_ms is None else round(a.ttft_ms, 3),
            "prompt_tokens": a.usage.prompt_tokens if a.usage is not None else 0,
            "completion_tokens": a.usage.completion_tokens if a.usage is not None else 0,
            "cost_usd": round(a.cost_usd, 10),
            "error": None if a.error is None else content.error_text(a.error, rec.content_mode),
        }
        for a in rec.attempts
    ]


def row(rec: RequestRecord, baseline: float, max_content_bytes: int) -> tuple[Any, ...]:
    u = rec.usage
    provider = None  # the serving attempt's (a loop: a generator cost the writer ~0.5 µs a record)
    for a in reversed(rec.attempts):
        if a.deployment == rec.deployment:
            provider = a.provider
            break
    detail = {
        "tags": rec.tags or [],
        "reasons": rec.reasons,
        "admission": rec.admission,
        "shadow_of": rec.shadow_of,
        "cache_saved_usd": rec.saved_usd,
        "priority": rec.priority,
        "attempts": attempt_timeline(rec),
    }
    if rec.admission_note is not None:
        detail["admission_note"] = rec.admission_note
    if rec.cache_writer is not None:
        detail["cache_writer"] = rec.cache_writer
    if rec.skipped:  # why: a refusal, stored as an attempt's error is (it may quote the request)
        mode = rec.content_mode
        detail["skipped"] = [{"deployment": name, "why": content.error_text(why, mode)} for name, why in rec.skipped]
    ttft = rec.ttft_ms
    stored = content.stored(rec, max_content_bytes)
    model = redact.text(rec.model)[:200]  # cut after: a repeated `key=` shape grows as it is redacted
    return (
        rec.request_id, rec.correlation_id, rec.started, rec.key, rec.team, rec.user,
        model, rec.route, rec.rule, rec.policy, rec.task, rec.difficulty, rec.variant, rec.deployment,
        provider, int(rec.stream), rec.status, rec.outcome, _error_class(rec), rec.latency_ms, ttft,
        rec.queue_ms, u.prompt_tokens if u else 0, u.completion_tokens if u else 0,
        int(u.estimated) if u else 0, rec.cost_usd, baseline, rec.cache, len(rec.attempts),
        orjson.dumps(detail).decode(), None if stored is None else orjson.dumps(stored).decode(),
    )  # fmt: skip
