"""Checks across the sections of a schema-valid config: names that refer to other sections,
secret references that resolve, TLS files that load, budgets and keys that agree."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from edgeroute import secrets
from edgeroute.config.prices import parse_hhmm
from edgeroute.config.schema import Config, Ledger, Model
from edgeroute.config.tls import check_tls
from edgeroute.telemetry import settings as telemetry_settings

_OPENAI = ("openai", "openai_compatible")  # provider kinds with an OpenAI-format /embeddings


def unknown(kind: str, name: str, known: Iterable[str]) -> str:
    """ "unknown model 'gpt4o' (did you mean 'gpt-4o'?)"."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"unknown {kind} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


# A model's settings that only the route serving a request reads (dispatch, the core's order).
_ROUTE_ONLY = frozenset(
    {"strategy", "fallbacks", "context_window_fallbacks", "fallbacks_on", "hedge", "timeouts", "max_attempts"}
)


def _chooses(cfg: Config, name: str) -> str | None:
    """Why a model's own name never counts in budgets and rate limits, or None: it chooses among
    routes (a policy, an experiment), and they count the route that serves a request."""
    m = cfg.models.get(name)
    if m is None or (m.policy is None and m.experiment is None):
        return None
    routes = (
        [c.route for c in m.policy.candidates]
        if m.policy
        else [v.route for v in m.experiment.variants]
        if m.experiment
        else []
    )
    kind = "a policy" if m.policy is not None else "an experiment"
    return (
        f"model {name!r} chooses among routes ({kind}), and budgets and rate limits count the route "
        f"that serves a request: this would never count; name its routes ({', '.join(map(repr, routes))})"
    )


def cross_check(cfg: Config, base_dir: Path | None = None) -> list[tuple[str, str]]:
    """Every problem a single field's schema cannot see: references between sections, secrets
    that do not resolve, TLS files; as (path in the file, message), section by section.
    `base_dir`: the config file's folder, where `governance.versions_key`'s `file:` is read."""
    problems: list[tuple[str, str]] = []
    for name, d in cfg.deployments.items():
        if d.provider not in cfg.providers:
            problems.append((f"deployments.{name}.provider", unknown("provider", d.provider, cfg.providers)))
    problems += _cross_check_cache(cfg)
    for name, m in cfg.models.items():
        problems += _cross_check_model(cfg, name, m)
    problems += _cross_check_rules(cfg)
    problems += _cross_check_cost(cfg)
    problems += _cross_check_priority(cfg)
    budgets = {b.name for b in cfg.budgets.limits}
    problems += telemetry_settings.cross_check(cfg.alerts, cfg.tracing, set(cfg.deployments), budgets)
    for i, b in enumerate(cfg.budgets.limits):
        for j, a in enumerate(b.actions):
            if a.webhook is not None and (problem := secrets.url_problem(a.webhook)) is not None:
                problems.append((f"budgets.limits[{i}].actions[{j}].webhook", problem))
    problems += _cross_check_credentials(cfg, base_dir)
    return problems


def _cross_check_cache(cfg: Config) -> list[tuple[str, str]]:
    """A shared cache without Redis, semantic caching without its packages or a usable embedder."""
    problems: list[tuple[str, str]] = []
    if cfg.cache.backend == "redis" and cfg.shared_state is None:
        problems.append(("cache.backend", "the redis backend needs shared_state.redis_url"))
    semantic = {n: m.cache for n, m in cfg.models.items() if m.cache is not None and m.cache.mode == "semantic"}
    builtin = [n for n, c in semantic.items() if c.embedder is None]
    for name, needs in (*((n, ("usearch",)) for n in semantic), *((n, ("wordllama",)) for n in builtin)):
        if not all(importlib.util.find_spec(p) for p in needs):
            problems.append((f"models.{name}.cache.mode", "semantic caching needs: pip install 'edgeroute[semantic]'"))
            break
    for name, c in semantic.items():
        if c.embedder is None:
            continue
        where = f"models.{name}.cache.embedder"
        if c.embedder not in cfg.deployments:
            problems.append((where, unknown("deployment", c.embedder, cfg.deployments)))
        elif (p := cfg.providers.get(cfg.deployments[c.embedder].provider)) is not None and p.kind not in _OPENAI:
            problems.append((where, f"the embedder's provider must speak OpenAI's format, not {p.kind}"))
    return problems


def _cross_check_model(cfg: Config, name: str, m: Model) -> list[tuple[str, str]]:
    """A model's deployments or chooser (a policy, an experiment), the models it names (routes,
    shadow, fallbacks) and the settings its chooser would ignore."""
    problems: list[tuple[str, str]] = []
    choosers = [f for f in ("policy", "experiment") if getattr(m, f) is not None]
    if not m.deployments and not choosers:
        problems.append((f"models.{name}.deployments", "a model needs deployments, a policy or an experiment"))
    if m.deployments and choosers:
        problems.append((f"models.{name}.{choosers[0]}", "a model with a policy or experiment has no deployments"))
    if len(choosers) == 2:
        problems.append((f"models.{name}.experiment", "use either a policy or an experiment"))
    if choosers and len(choosers) == 1:
        # The route it chooses serves the request with its own settings: these would do nothing.
        for field in sorted(m.model_fields_set & _ROUTE_ONLY):
            kind = "a policy" if choosers[0] == "policy" else "an experiment"
            problems.append(
                (f"models.{name}.{field}", f"model {name!r} chooses among routes ({kind}), which serve with "
                 f"their own {field}: set it on them (a chooser takes cache and shadow for its routes)")
            )  # fmt: skip
    refs: list[tuple[str, str]] = []
    if m.policy is not None:
        refs += [(f"models.{name}.policy.candidates[{i}].route", c.route) for i, c in enumerate(m.policy.candidates)]
    if m.experiment is not None:
        refs += [
            (f"models.{name}.experiment.variants[{i}].route", v.route) for i, v in enumerate(m.experiment.variants)
        ]
        total = sum(v.percent for v in m.experiment.variants)
        if abs(total - 100) > 1e-6:
            problems.append((f"models.{name}.experiment.variants", f"percents add up to {total:g}, not 100"))
    if m.shadow is not None:
        refs.append((f"models.{name}.shadow.model", m.shadow.model))
    for path, ref in refs:
        target = cfg.models.get(ref)
        # An experiment may compare a policy route with a fixed one; everything else needs deployments.
        policy_ok = ".experiment." in path and target is not None and target.policy is not None
        if target is None:
            problems.append((path, unknown("model", ref, cfg.models)))
        elif not target.deployments and not policy_ok:
            problems.append((path, f"{ref!r} must be a model with deployments"))
    for i, dep in enumerate(m.deployments):
        if dep not in cfg.deployments:
            problems.append((f"models.{name}.deployments[{i}]", unknown("deployment", dep, cfg.deployments)))
    lists = [("fallbacks", m.fallbacks), ("context_window_fallbacks", m.context_window_fallbacks)]
    lists += [(f"fallbacks_on.{cls}", names) for cls, names in m.fallbacks_on.items()]
    for field, names in lists:
        for i, f in enumerate(names):
            if f not in cfg.models:
                problems.append((f"models.{name}.{field}[{i}]", unknown("model", f, cfg.models)))
            elif f == name:
                problems.append((f"models.{name}.{field}[{i}]", "a model cannot fall back to itself"))
    return problems


def _cross_check_rules(cfg: Config) -> list[tuple[str, str]]:
    """Rule names used twice, and the routes, deployments, tags and times rules name."""
    problems: list[tuple[str, str]] = []
    # `provider:NAME` is implied for every deployment (the core adds it), so rules may use it.
    deployment_tags = sorted({t for d in cfg.deployments.values() for t in (*d.tags, f"provider:{d.provider}")})
    seen: set[str] = set()
    for i, r in enumerate(cfg.rules):
        if r.name in seen:
            problems.append((f"rules[{i}].name", f"rule name {r.name!r} is used twice"))
        seen.add(r.name)
        if r.then.route is not None and r.then.route not in cfg.models:
            problems.append((f"rules[{i}].then.route", unknown("model", r.then.route, cfg.models)))
        for j, dep in enumerate(r.then.deployments):
            if dep not in cfg.deployments:
                problems.append((f"rules[{i}].then.deployments[{j}]", unknown("deployment", dep, cfg.deployments)))
        for field, tags in (("require_tags", r.then.require_tags), ("exclude_tags", r.then.exclude_tags)):
            for j, tag in enumerate(tags):
                if tag not in deployment_tags:
                    why = "the rule could never be satisfied" if field == "require_tags" else "it excludes nothing"
                    problems.append(
                        (
                            f"rules[{i}].then.{field}[{j}]",
                            unknown("tag", tag, deployment_tags) + f": no deployment has it, so {why}",
                        )
                    )
        if r.when.time is not None:
            for field in ("start", "end"):
                try:
                    parse_hhmm(getattr(r.when.time, field))
                except ValueError as e:
                    problems.append((f"rules[{i}].when.time.{field}", str(e)))
    return problems


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _cross_check_credentials(cfg: Config, base_dir: Path | None) -> list[tuple[str, str]]:
    """Client and provider keys that do not resolve, and provider TLS files that do not load."""
    problems: list[tuple[str, str]] = []
    for i, ref in enumerate(cfg.server.api_keys):
        try:
            empty = not secrets.resolve(ref).reveal()
        except secrets.SecretError as e:
            problems.append((f"server.api_keys[{i}]", str(e)))
            continue
        if empty:  # a variable set but empty (compose's `${VAR}` unset on the host), or ""
            problems.append((f"server.api_keys[{i}]", "is empty: a request without any key would match it"))
    for name, p in cfg.providers.items():
        if p.api_key is not None:
            try:
                secrets.resolve(p.api_key)
            except secrets.SecretError as e:
                problems.append((f"providers.{name}.api_key", str(e)))
        for header, value in p.headers.items():
            if value.startswith(secrets.REFERENCE_PREFIXES):
                try:
                    secrets.resolve(value)
                except secrets.SecretError as e:
                    problems.append((f"providers.{name}.headers.{header}", str(e)))
        if p.tls is not None and not secrets.is_offline():
            problems += check_tls(f"providers.{name}.tls", p.tls)
    if (versions_key := cfg.governance.versions_key) is not None:
        try:
            empty = not secrets.resolve(versions_key, base_dir=base_dir).reveal().strip()
        except secrets.SecretError as e:
            problems.append(("governance.versions_key", str(e)))
        else:
            if empty:
                problems.append(
                    ("governance.versions_key", "is empty: literal secrets in versions would be sealed under no key")
                )
    return problems


def _cross_check_cost(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if cfg.keys and cfg.server.api_keys:
        problems.append(("keys", "use either keys (virtual keys) or server.api_keys, not both"))
    owner_of: dict[str, str] = {}  # token digest -> key: two keys with one token would be one identity
    for name, k in cfg.keys.items():
        if (k.token is None) == (k.token_sha256 is None):
            problems.append((f"keys.{name}", "give exactly one of token (a reference) or token_sha256"))
            continue
        try:
            digest = k.token_sha256 or hashlib.sha256(secrets.resolve(k.token or "").reveal().encode()).hexdigest()
        except secrets.SecretError as e:
            problems.append((f"keys.{name}.token", str(e)))
            continue
        if digest.lower() == EMPTY_SHA256:  # `env:VAR` set but empty: a key no client could ever send
            problems.append((f"keys.{name}.token", "is empty: no client could use this key"))
            continue
        if (other := owner_of.setdefault(digest.lower(), name)) != name:
            problems.append((f"keys.{name}", f"has the same token as keys.{other}"))
    for section, names, known in (
        ("models", cfg.rate_limits.models, cfg.models),
        ("deployments", cfg.rate_limits.deployments, cfg.deployments),
    ):
        for n in names:
            if n not in known:
                problems.append((f"rate_limits.{section}.{n}", unknown(section[:-1], n, known)))
            elif section == "models" and (why := _chooses(cfg, n)) is not None:
                problems.append((f"rate_limits.models.{n}", why))
            if names[n].max_parallel is not None:  # one Limit type: say so rather than ignore it
                instead = "a key's limits or rate_limits.per_key" + (
                    ", or max_concurrency on the deployment" if section == "deployments" else ""
                )
                problems.append(
                    (f"rate_limits.{section}.{n}.max_parallel", f"only keys have max_parallel; use {instead}")
                )
    seen: set[str] = set()
    for i, b in enumerate(cfg.budgets.limits):
        where = f"budgets.limits[{i}]"
        if b.name in seen:
            problems.append((f"{where}.name", f"budget name {b.name!r} is used twice"))
        seen.add(b.name)
        if (b.period == "rolling") != (b.window_hours is not None):
            problems.append((f"{where}.window_hours", "required for period: rolling, and only then"))
        if b.scope == "global" and b.match is not None:
            problems.append((f"{where}.match", "a global budget matches everything"))
        if b.scope == "model" and b.match is not None and b.match not in cfg.models:
            problems.append((f"{where}.match", unknown("model", b.match, cfg.models)))
        elif b.scope == "model" and b.match is not None and (why := _chooses(cfg, b.match)) is not None:
            problems.append((f"{where}.match", why))
        if b.scope == "key" and b.match is not None and b.match not in cfg.keys:
            problems.append((f"{where}.match", unknown("key", b.match, cfg.keys)))
        for j, a in enumerate(b.actions):
            if a.action == "downgrade":
                if a.to is None:
                    problems.append((f"{where}.actions[{j}].to", "downgrade needs a target model"))
                elif a.to not in cfg.models:
                    problems.append((f"{where}.actions[{j}].to", unknown("model", a.to, cfg.models)))
            elif a.to is not None:
                problems.append((f"{where}.actions[{j}].to", "only downgrade takes a target"))
    if cfg.ledger is not None and cfg.ledger.backend == "postgres" and not cfg.ledger.dsn:
        problems.append(("ledger.dsn", "the postgres backend needs a dsn"))
    # The keys' tokens were resolved above (each problem is reported once).
    if cfg.ledger is not None and cfg.ledger.dsn is not None:
        try:
            secrets.resolve(cfg.ledger.dsn)
        except secrets.SecretError as e:
            problems.append(("ledger.dsn", str(e)))
    return problems


def shared_state_notes(cfg: Config) -> list[str]:
    """What a valid config loses without saying (`check` prints it, `serve` logs it): budgets
    shared through Redis beside a ledger of this instance's own. A Redis that restarts empty
    is filled again from one instance's ledger: the others' spend is forgotten, and each
    budget may be spent again (red3M F5: $3.28 spent against $2)."""
    if cfg.shared_state is None or not (cfg.budgets.limits or cfg.governance.managed_keys):
        return []
    backend = (cfg.ledger or Ledger()).backend
    if backend == "postgres":
        return []
    counted = "this instance's spend only" if backend == "sqlite" else "no spend at all (a memory ledger)"
    return [
        f"shared_state with a {backend} ledger: after Redis restarts empty, budgets count {counted},"
        " and the other instances' spend may be spent again; share one PostgreSQL ledger"
        " (ledger.backend: postgres), or give Redis persistence (appendonly) so that it keeps them"
    ]


def _cross_check_priority(cfg: Config) -> list[tuple[str, str]]:
    """Class names that no class defines, and capacity settings that need each other."""
    classes = cfg.priority.classes
    problems: list[tuple[str, str]] = []
    if cfg.priority.default is not None and cfg.priority.default not in classes:
        problems.append(("priority.default", unknown("priority class", cfg.priority.default, classes)))
    for key_id, k in cfg.keys.items():
        if k.priority is not None and k.priority not in classes:
            problems.append((f"keys.{key_id}.priority", unknown("priority class", k.priority, classes)))
        for i, p in enumerate(k.priorities):
            if p not in classes:
                problems.append((f"keys.{key_id}.priorities[{i}]", unknown("priority class", p, classes)))
    for i, r in enumerate(cfg.rules):
        if r.then.priority is not None and r.then.priority not in classes:
            problems.append((f"rules[{i}].then.priority", unknown("priority class", r.then.priority, classes)))
        for j, p in enumerate(r.when.priority):
            if p not in classes:
                problems.append((f"rules[{i}].when.priority[{j}]", unknown("priority class", p, classes)))
    for name, d in cfg.deployments.items():
        if d.reserve_percent and d.max_concurrency is None:
            problems.append((f"deployments.{name}.reserve_percent", "reserve_percent needs max_concurrency"))
    return problems
