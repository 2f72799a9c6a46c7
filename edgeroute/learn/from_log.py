"""Outcome rows from the request log: what `router train --from-log` trains on.

Each request a client rated with `POST /v1/feedback` (the `feedback` table) becomes one row
``{"prompt", "model", "score", "cost_usd"}``: the prompt is the text of the user's messages,
taken from the request body the log kept (the same text the core's router reads); the model
is the router output the config's policies name for the route that answered (the route's own
name where no policy names it); the cost is what the request cost. The log keeps no prompt by
default (`request_log.log_content: none`): then there is nothing to train on, and
:class:`LogRows` says so and what to enable.

Only answered requests count (status 200, not a cache hit: a hit says nothing of the route's
cost); a prompt cut at `max_content_bytes` or a body that is not a chat request is skipped
and counted. The trained router routes every tenant's requests, so the rows are counted per
tenant (as the online learner counts them, `learning.tenant_id`: the team; keyless callers and
config keys of no team with role `operator` or above are the operator's one; any other key of
no team is a tenant of its own) and a tenant that gave most of them is named: check its
ratings first. A route the client named itself (`model: weak`, no policy or experiment chose
it) is the operator's evidence only when the operator's caller named it (an evaluation run
that asks each route in turn): a tenant's client naming the route it rates chose which route
its ratings teach about, so those rows are skipped and counted, as the online learner skips them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from edgeroute.config import Config
from edgeroute.cost.ledger_store import Backend
from edgeroute.learning import ANONYMOUS, tenant_id

_SQL = """SELECT r.id, r.route, r.cost_usd, r.content, f.score, r.team, r.key_id, r.policy, r.variant
FROM feedback f JOIN requests r ON r.id = f.request_id
WHERE r.status = 200 AND (r.cache IS NULL OR r.cache IN ('miss', 'bypass')) AND f.ts >= ?
  AND (r.outcome IS NULL OR r.outcome <> 'shadow')
ORDER BY r.ts"""


@dataclass
class LogRows:
    """The outcome rows found, and what was skipped and why (printed by the CLI)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rated: int = 0  # answered requests with a feedback score
    no_content: int = 0  # ... whose prompt the log did not keep
    cut: int = 0  # ... whose body was cut at max_content_bytes
    unreadable: int = 0  # ... whose body is not a chat request with user text
    named: int = 0  # ... whose route a tenant's client named (no policy or experiment chose it)
    tenants: Counter[str] = field(default_factory=Counter)  # usable rows per tenant

    def dominant(self) -> tuple[str, int] | None:
        """The team that gave more than half the usable rows, when several tenants gave some
        (the operator's own tenant, keys of no team and keyless callers, is trusted)."""
        if len(self.tenants) < 2:
            return None
        tenant, n = self.tenants.most_common(1)[0]
        return (tenant, n) if tenant != ANONYMOUS and 2 * n > len(self.rows) else None

    def explain(self) -> str:
        parts = [f"{self.rated} rated request(s) in the request log, {len(self.rows)} usable"]
        for n, why in (
            (self.no_content, "without stored content"),
            (self.cut, "cut at request_log.max_content_bytes"),
            (self.unreadable, "not a chat request with user text"),
            (self.named, "on a route a tenant's client named itself (not chosen by routing)"),
        ):
            if n:
                parts.append(f"{n} {why}")
        if (top := self.dominant()) is not None:
            parts.append(f"{top[1]} of the usable from {top[0]} alone: check its ratings before using the router")
        return "; ".join(parts)

    def hint(self) -> str | None:
        """What the user must change when the log cannot train a router, or None."""
        if self.rated == 0:
            return (
                "no request in the log has a feedback score: post scores to /v1/feedback "
                '({"request_id": <x-request-id of the answer>, "score": 0..1}) with the request log on'
            )
        if not self.rows and self.no_content:
            return (
                "the request log keeps no prompts (private by default): set request_log.log_content "
                "to redacted or full (or content_models: {<model>: redacted} for the routed model), "
                "then collect feedback again; requests logged without content cannot be used"
            )
        return None


def route_outputs(cfg: Config) -> dict[str, str]:
    """Route name -> the router output the config's policies map it to (first policy wins)."""
    out: dict[str, str] = {}
    for m in cfg.models.values():
        if m.policy is not None:
            for c in m.policy.candidates:
                out.setdefault(c.route, c.model)
    return out


def user_text(body: Any) -> str:
    """The user's messages' text, each followed by a newline: what the core's router reads
    (`request.rs`: a string content, or the `text` of `{"type": "text"}` parts)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return ""
    out: list[str] = []
    for m in body["messages"]:
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        c = m.get("content")
        if isinstance(c, str):
            out.append(c + "\n")
        elif isinstance(c, list):
            texts = (p.get("text") for p in c if isinstance(p, dict) and p.get("type") == "text")
            out += [t + "\n" for t in texts if isinstance(t, str)]
    return "".join(out)


def read(db: Backend, cfg: Config, since: float = 0.0) -> LogRows:
    """The rated requests' outcome rows (feedback given at or after `since`)."""
    outputs = route_outputs(cfg)
    found = LogRows()
    for _rid, route, cost, content, score, team, key, policy, variant in db.query(_SQL, (since,)):
        found.rated += 1
        # The log keeps no role: a config key's is known; a managed key of no team is its own tenant.
        tenant = tenant_id(team, key, cfg.keys[key].role if key in cfg.keys else None)
        if policy is None and variant is None and tenant != ANONYMOUS:
            found.named += 1
            continue
        stored = json.loads(content) if content else None
        if not isinstance(stored, dict) or not isinstance(stored.get("request"), str):
            found.no_content += 1
            continue
        try:
            prompt = user_text(json.loads(stored["request"]))
        except ValueError:  # a body cut at max_content_bytes is no longer JSON
            found.cut += bool(stored.get("truncated"))
            found.unreadable += not stored.get("truncated")
            continue
        if not prompt.strip():
            found.unreadable += 1
            continue
        found.rows.append(
            {"prompt": prompt, "model": outputs.get(route, route), "score": float(score), "cost_usd": float(cost)}
        )
        found.tenants[tenant] += 1
    return found
