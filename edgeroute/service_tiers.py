"""Which `service_tier` a client may ask a provider for.

OpenAI bills a request by the tier it names: `priority` (and the older `scale`) at a
premium over the standard price, `flex` at a discount. edgeroute prices every request at its
deployment's price, so a client naming `priority` passed it on and spent more than every
budget and the ledger counted. A tier outside `server.service_tiers` (by default `auto`,
`default` and `flex`, which costs no more than priced) is refused with a 400 naming the
field; an operator who allows `priority` prices its deployments at that tier's price.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import orjson

from edgeroute.errors import ProxyError, checked_json


def check_raw(raw: str | None, allowed: Collection[str]) -> None:
    """Refuses a chat request whose `service_tier` (as the core read it, JSON text: the body is
    not parsed nor scanned again in Python) is outside `allowed`. The core skips what it does not
    decode (`1e400`, a lone surrogate): such a value is refused, never a 500."""
    if raw is not None:
        check({"service_tier": checked_json(raw)}, allowed)


def check(req: dict[str, Any], allowed: Collection[str]) -> None:
    tier = req.get("service_tier")
    if tier is None or tier in allowed:
        return
    shown = tier if isinstance(tier, str) else orjson.dumps(tier).decode()
    raise ProxyError(
        400,
        f"service_tier {shown[:40]!r} is not allowed on this gateway (allowed: {', '.join(allowed)}): it is billed"
        " at another price than its deployments are priced at.",
        code="service_tier_not_allowed",
        param="service_tier",
    )
