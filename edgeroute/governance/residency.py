"""Residency as a policy: a key or team bound to a region reaches only that region's deployments.

The core enforces it, so that the decision's order (first try, retries, fallbacks, the
hedge) already excludes every other deployment, and anything that reads the decision
(the cache, shadow traffic, class fallbacks that follow the matched rule) inherits it.
The core's rules are first-match, so residency cannot be one more rule in front: it is
folded into every rule instead. For each region and each rule R the core gets a copy
"R@residency:<region>" that also requires the region's tag, placed (by priority) before
all the original rules, and one catch-all "residency:<region>" after the copies that
requires the tag alone. The copies match on a marker request tag that only the server
adds (client tags that look like one are dropped), so a request bound to a region
matches a copy or the catch-all, never an original rule. A rule with `tags:` gets
marker tags combined with each of its tags, since a rule's tags match any one of them.

Only configs with a `governance.residency` section get the copies; everything else is
unchanged (and pays nothing on the request path).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import orjson

from edgeroute.config import Config, Rule
from edgeroute.cost.keys import Identity
from edgeroute.errors import ProxyError, checked_json

MARK = "@residency:"


def regions(cfg: Config) -> frozenset[str]:
    """Regions with at least one deployment (by the tag prefix)."""
    res = cfg.governance.residency
    if res is None:
        return frozenset()
    p = res.tag_prefix
    return frozenset(t[len(p) :] for d in cfg.deployments.values() for t in d.tags if t.startswith(p) and t != p)


def region_of(cfg: Config, key_id: str | None, team: str | None, own: str | None = None) -> str | None:
    res = cfg.governance.residency
    return own if res is None else res.region_of(key_id, team, own)


def effective(cfg: Config) -> Config:
    """`cfg` with the residency copies of its rules (itself when residency is off)."""
    res = cfg.governance.residency
    if res is None:
        return cfg
    rs = sorted(regions(cfg))
    if not rs or any(MARK in r.name for r in cfg.rules):
        return cfg  # nothing to confine to, or already folded in
    prios = [r.priority for r in cfg.rules] or [0]
    lo, hi = min(prios), max(prios)
    offset = hi - lo + 2
    extra: list[Rule] = []
    for region in rs:
        need = res.tag_prefix + region
        for r in cfg.rules:
            tags = [t + MARK + region for t in r.when.tags] if r.when.tags else [MARK + region]
            then = r.then.model_copy(update={"require_tags": [*r.then.require_tags, need]})
            extra.append(
                r.model_copy(
                    update={
                        "name": f"{r.name}{MARK}{region}",
                        "priority": r.priority + offset,
                        "when": r.when.model_copy(update={"tags": tags}),
                        "then": then,
                    }
                )
            )
        extra.append(
            Rule.model_validate(
                {
                    "name": f"residency:{region}",
                    "priority": lo + offset - 1,
                    "when": {"tags": [MARK + region]},
                    "then": {"require_tags": [need]},
                }
            )
        )
    return cfg.model_copy(update={"rules": [*extra, *cfg.rules]})


def request_tags(tags: list[str] | None, region: str | None, known: frozenset[str]) -> list[str] | None:
    """The tags the core sees for a request: the client's, without marker look-alikes, plus
    the region's markers. A region without deployments is refused here (the core has no
    rule for it, so nothing else would stop the request)."""
    if tags is not None and any(MARK in t for t in tags):
        tags = [t for t in tags if MARK not in t]
    if region is None:
        return tags
    if region not in known:
        raise ProxyError(
            403,
            f"This key may only use deployments in region '{region}', and none is configured.",
            code="residency_unavailable",
        )
    client = tags or []
    return [*client, *(t + MARK + region for t in client), MARK + region]


def check_order(cfg: Config, names: Iterable[str], region: str) -> None:
    """Defence in depth: every deployment a decision may reach carries the region's tag."""
    res = cfg.governance.residency
    need = (res.tag_prefix if res is not None else "region:") + region
    for n in names:
        if need not in cfg.deployments[n].tags:
            msg = "Internal error: a routing decision left the key's region."
            raise ProxyError(500, msg, code="residency_violation")


def key_tags(ident: Identity, tags: list[str] | None, known: frozenset[str]) -> list[str] | None:
    """A keyed request's tags for the core: its key's denied tags refused, its region added."""
    if tags and ident.deny_tags and (denied := ident.deny_tags.intersection(tags)):
        raise ProxyError(403, f"This key may not use the tag '{min(denied)}'.", code="tag_not_allowed")
    return request_tags(tags, ident.residency, known)


def check_model(ident: Identity, model: str) -> None:
    """A key held to some models is answered for another as for a model that does not exist
    (OpenAI's answer, and `GET /v1/models/{id}`'s): a 403 told the key which other teams' model
    names exist."""
    if ident.models is not None and model not in ident.models:
        msg = f"The model `{model}` does not exist or you do not have access to it."  # the core's UnknownModel
        raise ProxyError(404, msg, code="model_not_found", param="model")


def _asked(body: bytes) -> Any:
    """The request body the core took, read. A field it skips is not decoded, so orjson may refuse
    the body (a lone surrogate `"\ud800"`, a number past a double `1e400`): it is read then as most
    parsers read it, so the asked model gets the 404 a model that does not exist gets (a 400 would
    tell the two apart); refused (fail closed) when even that cannot read it."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return checked_json(body)


def check_asked_model(ident: Identity, body: bytes) -> None:
    """`check_model` for the model a request body the core parsed asks for, when the core
    refused it without a decision (its context window, a rule, no deployment)."""
    if ident.models is None:
        return
    req = _asked(body)
    asked = req.get("model") if isinstance(req, dict) else None
    if isinstance(asked, str):
        check_model(ident, asked)
