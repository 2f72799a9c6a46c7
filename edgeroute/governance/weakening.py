"""Which config changes weaken data governance, an admin's act (as access changes are).

An operator may roll back routing, deployments and tighter budgets; a version from before an admin
set residency, added a PII rule or lowered what the request log keeps also undid those, and
with them where prompts may go and what is kept of them. :func:`weakenings` names each way a
target config is weaker than the running one:

- `governance.residency` removed, its `tag_prefix` changed, a key's or team's region removed
  or changed (a new one is stronger);
- a PII rule (a rule with `when.pii`, `when.patterns` or `when.keywords`: a regular expression
  or a literal is how an operator finds data the detectors do not know, an employee id or a
  project's name) removed or changed, or a rule put ahead of one (the first match by priority
  wins, so it would take the PII requests first); likewise a rule that rejects (`then.reject`:
  a team's suspension, a user's or a role's refusal decides who may call what), and a
  restriction rule: one that confines where its requests may go (`then.require_tags`,
  `then.exclude_tags`, `then.deployments` or `then.route`, whatever it matches: a team kept on
  its EU deployments or its own model, a model's or every request kept there by hand). Rules
  are ordered by `priority` as the config's schema reads it (`"10"` and `10.0` are 10);
- a deployment that gains a tag a residency region, a PII or a restriction rule's
  `require_tags` names, or loses one its `exclude_tags` names (tags decide where those
  requests may go);
- a deployment added to the models a PII or restriction rule's `route` sends its requests to
  (or falls back to);
- a deployment those requests may reach (`_governed`) sent elsewhere: its provider's
  `base_url`, `proxy` or `options.region` changed, or (Bedrock, whose inference profiles
  `us.`/`eu.`/`global.` span regions) its model; compared as resolved through `provider:`,
  so a provider renamed alone is no change (Azure's `api_version` moves nothing);
- more content kept by the request log, for any key and model (`log_content`,
  `content_models`, `content_keys`, `enabled`: none < redacted < full), or kept longer or
  larger: `retention_days` or `max_db_mb` raised (or the size bound removed) while it records,
  `max_content_bytes` raised while it keeps content;
- `server.provider_files` from refused to shared (files at the provider named by id, passed
  to every tenant);
- a model's response cache shared more widely (`cache.scope` key < team < global), or, under a
  shared scope, made semantic or its `similarity` lowered (one tenant's answers served to others);
- a budget of `budgets.limits` removed, or changed but for a lower limit, and a rate limit
  (`rate_limits.per_key`, `.models`, `.deployments`, a key's `limits`: rpm, tpm, max_parallel)
  removed or raised (as the rollback guard holds them: `guard.held_for_a_human`); the output
  a request naming no `max_tokens` holds against budgets and TPM
  (`budgets.reserve_max_tokens`, `rate_limits.unbounded_output_tokens`) lowered;
- `governance.keys_stale_after_s` raised (an instance cut off from the key store serves keys
  revoked meanwhile that much longer).

Read from the config texts as written (YAML), so a change of form alone (a default spelt
out) may count as a change: the caller then needs an admin, never the other way round.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from edgeroute.cache.settings import SEMANTIC_THRESHOLD
from edgeroute.config.schema import Rule
from edgeroute.governance import guard

_PRIVACY = ("none", "redacted", "full")  # what the request log keeps, most private first


def weakenings(running: str, target: str) -> list[str]:
    """How `target` weakens data governance against `running`, one line each (empty: it does not)."""
    a, b = yaml.safe_load(running), yaml.safe_load(target)
    a, b = (x if isinstance(x, dict) else {} for x in (a, b))
    return (
        _residency(a, b)
        + _pii_rules(a, b)
        + _tags(a, b)
        + _destinations(a, b)
        + _log_content(a, b)
        + _log_bounds(a, b)
        + _provider_files(a, b)
        + _cache_sharing(a, b)
        + guard.looser_budgets(a, b)
        + guard.looser_limits(a, b)
        + _reservations(a, b)
        + _stale_keys(a, b)
        + _key_and_audit_bounds(a, b)
        + _telemetry_destinations(a, b)
    )


def _telemetry_destinations(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Traces and alert notifications sent to an address the running config does not use: a
    rollback could otherwise bring back a receiver set once, by whoever could edit the config
    then. Names the field, never the address (a webhook URL is often its own credential)."""
    out = []
    ta, tb = _mapping(a.get("tracing")), _mapping(b.get("tracing"))
    if tb.get("enabled") is True and (ta.get("enabled") is not True or tb.get("endpoint") != ta.get("endpoint")):
        out.append("tracing.endpoint sends traces to another address")
    was = {repr(_at(hook, "url")) for hook in _mapping(_at(a, "alerts", "webhooks")).values()}
    for name, hook in _mapping(_at(b, "alerts", "webhooks")).items():
        if repr(_at(hook, "url")) not in was:
            out.append(f"alerts.webhooks.{name} sends notifications to another address")
    return out


def _at(data: Any, *path: str) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _mapping(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def _list(data: Any) -> list[Any]:
    """A list as written, else none (a stored version is read before it is validated again)."""
    return data if isinstance(data, list) else []


def _residency(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    old, new = _at(a, "governance", "residency"), _at(b, "governance", "residency")
    if old is None:
        return []
    if new is None:
        return ["governance.residency removed"]
    out = []
    if _at(old, "tag_prefix") != _at(new, "tag_prefix"):
        out.append("governance.residency.tag_prefix changed")
    for part in ("keys", "teams"):
        now = _mapping(_at(new, part))
        for name, region in _mapping(_at(old, part)).items():
            if name not in now:
                out.append(f"governance.residency.{part}.{name} removed")
            elif now[name] != region:
                out.append(f"governance.residency.{part}.{name} changed from {region} to {now[name]}")
    return out


def _rules(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The rules in the order they are tried: highest priority first, then as written."""
    rules = [r for r in _list(data.get("rules")) if isinstance(r, dict)]
    return sorted(rules, key=lambda r: -_priority(r))


# A rule's priority read as the config reads it (`Rule.priority: int`, lax: `"10"` and `10.0` are
# 10, as the core sees them).
_PRIORITY: TypeAdapter[int] = TypeAdapter(int)


def _priority(rule: dict[str, Any]) -> float:
    """One the config cannot read sorts ahead of every rule: a change to it needs an admin."""
    try:
        return float(_PRIORITY.validate_python(rule.get("priority", Rule.model_fields["priority"].default)))
    except ValidationError:
        return float("inf")


def _is_pii(rule: dict[str, Any]) -> bool:
    return any(bool(_at(rule, "when", w)) for w in ("pii", "patterns", "keywords"))


def _restricts(rule: dict[str, Any]) -> bool:
    """Whether a rule confines where its requests may go: tags required or excluded, given
    deployments or a route, whatever it matches. A team's, user's or role's requests kept in the
    EU, a model's (`when.models`) or every request (no `when`) kept there by hand, read alike:
    the text cannot tell residency from a routing preference, so an admin decides."""
    then = _at(rule, "then")
    return any(bool(_list(_at(then, t))) for t in _CONFINING) or _at(then, "route") is not None


_CONFINING = ("require_tags", "exclude_tags", "deployments")  # with `route`: where a rule sends its requests


def _kind(rule: dict[str, Any]) -> str | None:
    """What a rule guards: 'PII' (data it finds), 'reject' (who or what it refuses),
    'restriction' (where its requests may go, `_restricts`), or nothing."""
    if _is_pii(rule):
        return "PII"
    if _at(rule, "then", "reject"):
        return "reject"
    return "restriction" if _restricts(rule) else None


def _guarding(data: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The rules that decide where requests may go, by kind: PII rules, then restriction rules."""
    rules = _rules(data)
    return [("PII", [r for r in rules if _is_pii(r)]), ("restriction", [r for r in rules if _kind(r) == "restriction"])]


def _pii_rules(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    old, new = _rules(a), _rules(b)
    out = []
    for i, rule in enumerate(old):
        if (kind := _kind(rule)) is None:
            continue
        if rule not in new:
            out.append(f"{kind} rule '{rule.get('name')}' removed or changed")
        elif any(r not in old[:i] for r in new[: new.index(rule)]):
            out.append(f"a rule put ahead of {kind} rule '{rule.get('name')}'")
    return out


def _tags(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Deployments' tags that would let PII, a restricted team's or a resident key's requests go
    where they could not."""
    pii = [r for _, rules in _guarding(a) for r in rules]
    required = {str(t) for r in pii for t in _list(_at(r, "then", "require_tags"))}
    excluded = {str(t) for r in pii for t in _list(_at(r, "then", "exclude_tags"))}
    prefix = _at(a, "governance", "residency", "tag_prefix") or "region:"
    resident = _at(a, "governance", "residency") is not None
    old = _mapping(a.get("deployments"))
    out = []
    for name, dep in _mapping(b.get("deployments")).items():
        now = {str(t) for t in _list(_at(dep, "tags"))}
        was = {str(t) for t in _list(_at(old.get(name), "tags"))}
        gained = {t for t in now - was if t in required or (resident and t.startswith(str(prefix)))}
        lost = (was - now) & excluded
        out += [f"deployments.{name} gains tag {t}" for t in sorted(gained)]
        out += [f"deployments.{name} loses tag {t}" for t in sorted(lost)]
    return out


def _governed(a: dict[str, Any]) -> dict[str, str]:
    """The deployments (of the running config) that residency, a PII or a restriction rule sends
    requests to, each with why: a region tag, a tag such a rule requires, named by one (its
    `deployments`, its `route`'s), or without every tag one excludes (those may take its requests)."""
    prefix = str(_at(a, "governance", "residency", "tag_prefix") or "region:")
    resident = _at(a, "governance", "residency") is not None
    guarding = _guarding(a)
    required = {str(t) for _, rules in guarding for r in rules for t in _list(_at(r, "then", "require_tags"))}
    out = {}
    for name, dep in _mapping(a.get("deployments")).items():
        tags = {str(t) for t in _list(_at(dep, "tags"))}
        why = sorted(t for t in tags if t in required or (resident and t.startswith(prefix)))
        if why:
            out[name] = f"tagged {', '.join(why)}"
    for kind, rules in guarding:
        excluded = [{str(t) for t in ex} for r in rules if (ex := _list(_at(r, "then", "exclude_tags")))]
        named = {str(d) for r in rules for d in _list(_at(r, "then", "deployments"))} | _routed(a, rules)
        for name, dep in _mapping(a.get("deployments")).items():
            tags = {str(t) for t in _list(_at(dep, "tags"))}
            if name in out:
                continue  # one reason is enough, the first found
            if name in named:
                out[name] = f"named by a {kind} rule"
            elif any(not tags & ex for ex in excluded):
                out[name] = f"open to a {kind} rule's requests"
    return out


def _routed(data: dict[str, Any], pii: list[dict[str, Any]]) -> set[str]:
    """The deployments PII rules' `route` sends their requests to in `data`: the route's, and
    those of every route it hands requests on to (fallbacks of any kind, a shadow's mirror,
    an experiment's variants, a policy's candidates), followed to the end."""
    models = _mapping(data.get("models"))
    seen: set[str] = set()
    todo = [r for r in (_at(rule, "then", "route") for rule in pii) if isinstance(r, str)]
    while todo:  # an odd shape in a stored version is skipped, a cycle ends
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in _next_routes(models.get(name)) if isinstance(m, str)]
    return {str(d) for m in seen for d in _list(_at(models.get(m), "deployments"))}


def _next_routes(model: Any) -> list[Any]:
    """The routes a model hands its requests (or copies of them) on to."""
    fallbacks_on = _mapping(_at(model, "fallbacks_on"))
    return [
        *_list(_at(model, "fallbacks")),
        *_list(_at(model, "context_window_fallbacks")),
        *(m for routes in fallbacks_on.values() for m in _list(routes)),
        _at(model, "shadow", "model"),
        *(_at(v, "route") for v in _list(_at(model, "experiment", "variants"))),
        *(_at(c, "route") for c in _list(_at(model, "policy", "candidates"))),
    ]


def _where(data: dict[str, Any], dep: Any) -> dict[str, Any]:
    """Where a deployment's requests go: its provider's address, forward proxy and region,
    and a Bedrock model id (an inference profile's prefix picks the regions it spans)."""
    name = _at(dep, "provider")
    provider = _mapping(_mapping(data.get("providers")).get(name) if isinstance(name, str) else None)
    url = provider.get("base_url")
    kind = provider.get("kind")
    return {
        "base_url": url.rstrip("/") if isinstance(url, str) else url,
        "proxy": provider.get("proxy"),
        "region": _at(provider, "options", "region"),
        "model": _at(dep, "model") if kind == "bedrock" else None,
    }


def _destinations(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Governed deployments whose requests would go elsewhere. Names the field, never its
    value (a proxy URL may hold credentials)."""
    new = _mapping(b.get("deployments"))
    out = []
    for name, why in _governed(a).items():
        if name not in new:
            continue  # removed: its requests go nowhere
        was, now = _where(a, _mapping(a.get("deployments"))[name]), _where(b, new[name])
        out += [f"deployments.{name} ({why}) changes its {f}" for f in was if was[f] != now[f]]
    for kind, rules in _guarding(a):
        joined = sorted(_routed(b, rules) - _routed(a, rules))
        out += [f"deployments.{d} joins the route of a {kind} rule" for d in joined]
    return out


def _level(value: Any) -> int:
    return _PRIVACY.index(value) if value in _PRIVACY else 0


# The request log's bounds, with their defaults (`RequestLogSettings`): a larger one keeps more.
_LOG_BOUNDS = (("retention_days", 30.0), ("max_db_mb", 1024.0), ("max_content_bytes", 64 * 1024))


def _log_bounds(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Request records kept longer (`retention_days`), more of them (`max_db_mb`, null: no
    bound) or more of each prompt and answer (`max_content_bytes`, while content is kept)."""
    old, new = _mapping(a.get("request_log")), _mapping(b.get("request_log"))
    if new.get("enabled", True) is False:
        return []
    keeps = any(level > 0 for level in _levels(new))
    out = []
    for name, default in _LOG_BOUNDS:
        if name == "max_content_bytes" and not keeps:
            continue
        was, now = old.get(name, default), new.get(name, default)
        if _bound(now) > _bound(was):
            shown = "removed" if now is None else f"raised from {'none' if was is None else was} to {now}"
            out.append(f"request_log.{name} {shown}")
    return out


def _provider_files(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Files and vector stores at the provider passed to every tenant (`edgeroute.provider_files`)."""
    was, now = (_at(x, "server", "provider_files") or "refused" for x in (a, b))
    return ["server.provider_files shared with every tenant"] if was == "refused" and now != "refused" else []


_SCOPES = ("key", "team", "global")  # who shares a model's cached answers, narrowest first


def _sharing(model: Any) -> tuple[int, str, float]:
    """A model's cache as (how widely it is shared: -1 none, else an index of _SCOPES; its
    mode; its semantic similarity), from its section as written (defaults as `RouteCache`'s)."""
    cache = _at(model, "cache")
    if not isinstance(cache, dict) or cache.get("mode") == "off":
        return -1, "off", 1.0
    scope = cache.get("scope", "key")
    similarity = cache.get("similarity", SEMANTIC_THRESHOLD)
    if not isinstance(similarity, int | float) or isinstance(similarity, bool):
        similarity = 0.0  # an odd one: the loosest
    level = _SCOPES.index(scope) if scope in _SCOPES else len(_SCOPES)  # an odd one: the widest
    return level, str(cache.get("mode", "exact")), float(similarity)


def _cache_sharing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Models whose cached answers would reach more tenants: a wider `scope`, or under a shared
    scope (team, global) a semantic cache turned on or its `similarity` lowered."""
    old, new = _mapping(a.get("models")), _mapping(b.get("models"))
    out = []
    for name in sorted(set(old) & set(new), key=str):
        (was, was_mode, was_sim), (now, mode, sim) = _sharing(old[name]), _sharing(new[name])
        if now > max(was, 0):
            shown = _SCOPES[now] if now < len(_SCOPES) else "an unknown scope"
            out.append(f"models.{name}.cache shared more widely ({shown})")
        elif now >= 1 and mode == "semantic" and (was_mode != "semantic" or sim < was_sim):
            out.append(f"models.{name}.cache matches more loosely under a shared scope (semantic)")
    return out


def _reservations(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The output a request naming no `max_tokens` is held to before it settles, lowered: more
    such requests pass a budget's or a TPM bucket's check at once (each may spend past it)."""

    def number(value: Any, default: int) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    was_b, now_b = (number(_at(x, "budgets", "reserve_max_tokens"), 4096) for x in (a, b))
    out = [f"budgets.reserve_max_tokens lowered from {was_b} to {now_b}"] if now_b < was_b else []
    set_ = [_at(x, "rate_limits", "unbounded_output_tokens") for x in (a, b)]
    if any(v is not None for v in set_):  # unset: the budgets' reserve, said above
        was_t, now_t = number(set_[0], was_b), number(set_[1], now_b)
        if now_t < was_t:
            out.append(f"rate_limits.unbounded_output_tokens lowered from {was_t} to {now_t}")
    return out


def _stale_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    was, now = (_at(x, "governance", "keys_stale_after_s") for x in (a, b))
    was, now = (v if isinstance(v, int | float) and not isinstance(v, bool) else 30.0 for v in (was, now))
    return [f"governance.keys_stale_after_s raised from {was:g} to {now:g}"] if now > was else []


# Governance bounds an operator may not loosen: the audit's retention (days; none: for ever)
# and the caps on managed keys (a team admin's key flood), with their defaults.
_KEY_CAPS = {"max_keys_per_team": 1000, "max_keys_without_team": 10000, "key_writes_per_minute": 120}


def _key_and_audit_bounds(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    was, now = (_bound(_at(x, "governance", "audit_retention_days")) for x in (a, b))
    if now < was:  # a shorter retention deletes audit entries, the rollback's own among them
        shown = "for ever" if was == float("inf") else f"{was:g}"
        out.append(f"governance.audit_retention_days shortened from {shown} to {now:g}")
    for name, default in _KEY_CAPS.items():
        was, now = (_at(x, "governance", name) for x in (a, b))
        was, now = (v if isinstance(v, int) and not isinstance(v, bool) else default for v in (was, now))
        if now > was:
            out.append(f"governance.{name} raised from {was} to {now}")
    return out


def _bound(value: Any) -> float:
    """A bound as a number; none (`max_db_mb: null`) is unbounded, an odd value no bound kept."""
    if value is None:
        return float("inf")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _levels(log: dict[str, Any]) -> list[int]:
    """Every content level a request log section names."""
    named = [*_mapping(log.get("content_models")).values(), *_mapping(log.get("content_keys")).values()]
    return [_level(log.get("log_content", "none")), *map(_level, named)]


def _log_content(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """More content kept for some key and model: each pair of named key (or none) and named
    model (or another) compared, a key's setting winning over a model's, as the log decides."""

    def settings(data: dict[str, Any]) -> tuple[int, dict[str, int], dict[str, int], bool]:
        log = _mapping(data.get("request_log"))
        on = log.get("enabled", True) is not False
        models = {str(m): _level(v) for m, v in _mapping(log.get("content_models")).items()}
        keys = {str(k): _level(v) for k, v in _mapping(log.get("content_keys")).items()}
        return _level(log.get("log_content", "none")), models, keys, on

    old, new = settings(a), settings(b)
    models = [*sorted(set(old[1]) | set(new[1])), None]
    keys = [*sorted(set(old[2]) | set(new[2])), None]

    def kept(s: tuple[int, dict[str, int], dict[str, int], bool], key: str | None, model: str | None) -> int:
        if not s[3]:
            return 0
        if key is not None and key in s[2]:
            return s[2][key]
        return s[1].get(model, s[0]) if model is not None else s[0]

    out = []
    for key in keys:
        for model in models:
            before, after = kept(old, key, model), kept(new, key, model)
            if after > before:
                who = " ".join(x for x in (f"key {key}" if key else "", f"model {model}" if model else "") if x)
                out.append(f"request_log keeps {_PRIVACY[after]} content, was {_PRIVACY[before]} ({who or 'default'})")
    return out
