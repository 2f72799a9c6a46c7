"""`GET /v1/models` and `GET /v1/models/{id}` in Anthropic's shapes, for an Anthropic client
(one that sends `anthropic-version`): its SDK's `models.list()` reads `type`, `display_name`
and `created_at`, which OpenAI's model objects do not have, and pages by `has_more`/`last_id`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgeroute.errors import ProxyError

CREATED_AT = "1970-01-01T00:00:00Z"  # OpenAI's listing says `created: 0`: the same instant
DEFAULT_LIMIT, MAX_LIMIT = 20, 1000  # Anthropic's


def model(name: str) -> dict[str, str]:
    return {"type": "model", "id": name, "display_name": name, "created_at": CREATED_AT}


def page(names: Sequence[str], query: Mapping[str, str]) -> dict[str, Any]:
    """The page of `names` that `query` asks for (`limit`, and `after_id` or `before_id`: the
    models after or before that one; a cursor naming no listed model is an empty page)."""
    raw = query.get("limit", str(DEFAULT_LIMIT))
    # ASCII digits only: `isdigit` also takes a superscript two (which `int` refuses: a 500)
    # and Arabic-Indic digits.
    limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 6 else 0
    if not 1 <= limit <= MAX_LIMIT:
        raise ProxyError(400, f"limit: must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    after, before = query.get("after_id"), query.get("before_id")
    if before is not None and after is None:  # the page ending just before it
        end = names.index(before) if before in names else 0
        start = max(0, end - limit)
        more = start > 0
    else:
        start = 0 if after is None else names.index(after) + 1 if after in names else len(names)
        end = min(len(names), start + limit)
        more = end < len(names)
    shown = names[start:end]
    return {
        "data": [model(n) for n in shown],
        "has_more": more,
        "first_id": shown[0] if shown else None,
        "last_id": shown[-1] if shown else None,
    }
