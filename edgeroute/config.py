"""The YAML config: schema, validation with precise errors, and the core's view of it.

A config declares providers (where and how to call), deployments (a model at a
provider, with prices, context window, weight and tags), public models (what clients
ask for, mapped to deployments) and rules. Validation is strict: an unknown key is an
error, and every error names the file, the path inside it and what is wrong.

This module owns the schema only; it does no I/O beyond reading the file and
resolving secret references.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgeroute import secrets
from edgeroute.cost import prices
from edgeroute.upstream_http import tls_context

ProviderKind = Literal["openai", "openai_compatible", "azure", "anthropic", "gemini", "bedrock"]
Strategy = Literal["weighted", "p2c_ewma", "lowest_cost", "least_busy"]
TaskType = Literal[
    "code", "math", "reasoning", "creative_writing", "summarization", "extraction", "translation", "knowledge_qa",
    "chat", "other",
]  # fmt: skip
FallbackClass = Literal["rate_limit", "server_error", "timeout", "context_window", "content_policy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds. `first_byte` bounds the wait for response headers (and, for streams, the
    first content event); `idle` bounds the gap between stream chunks."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(60.0, gt=0)
    idle: float = Field(30.0, gt=0)
    total: float = Field(600.0, gt=0)


class HealthCheck(_Strict):
    """Active probing of a provider's deployments."""

    interval: float = Field(10.0, gt=0)
    timeout: float = Field(5.0, gt=0)
    path: str = "/models"


class Tls(_Strict):
    """TLS to a provider beyond the system trust store: a private CA (a corporate gateway,
    a self-hosted model server) and a client certificate for mutual TLS. Paths to PEM files."""

    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None  # when the key is not in client_cert's file


class Provider(_Strict):
    kind: ProviderKind = "openai"
    base_url: str
    api_key: str | None = None
    max_connections: int = Field(256, ge=1)
    timeouts: Timeouts = Timeouts()
    tls: Tls | None = None
    health_check: HealthCheck | None = None
    headers: dict[str, str] = {}
    # Provider-specific settings (e.g. Azure's api_version, Bedrock's region).
    options: dict[str, Any] = {}

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class PriceWindow(_Strict):
    """A local time of day in which a price is multiplied (e.g. 0.5 for an off-peak discount)."""

    start: str
    end: str
    utc_offset_minutes: int = Field(0, ge=-14 * 60, le=14 * 60)
    multiplier: float = Field(ge=0)

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        prices.parse_hhmm(v)
        return v


class Price(_Strict):
    """USD per million tokens, plus per request. In YAML also ``catalogue`` or ``{catalogue: NAME, ...}``
    (see `edgeroute/cost/prices.py`), resolved to these fields when the config loads."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    per_request: float = Field(0.0, ge=0)
    windows: list[PriceWindow] = []
    source: str | None = None  # set by a catalogue reference, e.g. "catalogue:gpt-4o@2025-06-15"


class Deployment(_Strict):
    provider: str
    model: str
    price: Price = Price()
    context_window: int = Field(0, ge=0)
    weight: int = Field(1, ge=0)
    tags: list[str] = []
    encoding: Literal["o200k_base", "cl100k_base", "claude_estimate", "gemini_estimate"] | None = None

    @field_validator("price", mode="before")
    @classmethod
    def _catalogue_price(cls, v: Any, info: ValidationInfo) -> Any:
        return prices.resolve_price_input(v, str(info.data.get("model", "")))


class Hedge(_Strict):
    percentile: float = Field(95.0, gt=0, lt=100)
    delay_ms: float | None = Field(None, gt=0)
    min_delay_ms: float = Field(50.0, ge=0)
    budget_percent: float = Field(5.0, ge=0, le=100)
    min_samples: int = Field(20, ge=1)


class PolicyCandidate(_Strict):
    route: str  # a public model with deployments
    model: str  # the router model's output (LLM name) that predicts this route's quality


class Policy(_Strict):
    """Cheapest-sufficient routing: the cheapest candidate whose predicted score reaches the threshold."""

    candidates: list[PolicyCandidate] = Field(min_length=1)
    threshold: float = Field(ge=0, le=1)


class Variant(_Strict):
    route: str
    percent: float = Field(ge=0, le=100)


class Experiment(_Strict):
    """A sticky A/B split of a model's traffic between routes."""

    variants: list[Variant] = Field(min_length=1)
    sticky: Literal["user", "key"] = "user"


class Shadow(_Strict):
    """Mirror a sample of requests to a candidate route; answers are recorded, never returned."""

    model: str
    percent: float = Field(gt=0, le=100)


class Model(_Strict):
    # Empty for a model that only chooses among other routes (`policy` or `experiment`).
    deployments: list[str] = []
    policy: Policy | None = None
    experiment: Experiment | None = None
    shadow: Shadow | None = None
    strategy: Strategy = "weighted"
    fallbacks: list[str] = []
    context_window_fallbacks: list[str] = []
    # Fallback models by error class, tried before `fallbacks` when that class of error occurs.
    fallbacks_on: dict[FallbackClass, list[str]] = {}
    hedge: Hedge | None = None
    timeouts: Timeouts | None = None
    max_attempts: int = Field(4, ge=1, le=20)


class TimeWindow(_Strict):
    start: str
    end: str
    utc_offset_minutes: int = 0


class RuleWhen(_Strict):
    models: list[str] = []
    tags: list[str] = []
    users: list[str] = []
    teams: list[str] = []
    roles: list[str] = []
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    keywords: list[str] = []
    patterns: list[str] = []
    pii: list[Literal["email", "phone", "payment_card", "iban", "national_id"]] = []
    time: TimeWindow | None = None
    tasks: list[TaskType] = []


class RuleThen(_Strict):
    route: str | None = None
    deployments: list[str] = []
    require_tags: list[str] = []
    exclude_tags: list[str] = []
    strategy: Strategy | None = None
    reject: str | None = None


class Rule(_Strict):
    name: str
    priority: int = 0
    when: RuleWhen = RuleWhen()
    then: RuleThen


class RetryBudget(_Strict):
    ratio: float = Field(0.2, ge=0)
    min_per_sec: int = Field(10, ge=0)
    ttl_ms: int = Field(10_000, ge=1000)


class HealthSettings(_Strict):
    consecutive_failures: int = Field(5, ge=1)
    base_ejection_ms: int = Field(30_000, ge=0)
    max_ejection_ms: int = Field(300_000, ge=0)
    max_ejected_percent: int = Field(50, ge=0, le=100)
    ewma_decay_ms: int = Field(10_000, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)  # an error rate that opens the circuit...
    min_requests: int = Field(20, ge=1)  # ...once this many requests were seen recently


class Retry(_Strict):
    """Backoff between attempts on the same deployment (full jitter)."""

    base_ms: float = Field(25.0, ge=0)
    max_ms: float = Field(2_000.0, ge=0)
    max_retry_after_s: float = Field(10.0, ge=0)


class Server(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(4096, ge=1)
    drain_timeout: float = Field(30.0, ge=0)
    # Keys clients must present (by reference); none means no authentication (sidecar on loopback).
    api_keys: list[str] = []
    # One JSON line per request on stderr: the decision (route, rule and why), who served, cost.
    decision_log: bool = False


# -- cost control (edgeroute/cost/): keys, limits, budgets, ledger, shared state ------------------


class Limit(_Strict):
    """Requests and tokens (prompt + max completion) per minute, as token buckets."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class VirtualKey(_Strict):
    """A client key. The token is given by reference (``env:``/``file:``/literal) or as its
    SHA-256 hex digest; only the digest is kept in memory, and the id is what logs and the
    ledger show."""

    token: str | None = None
    token_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    team: str | None = None
    user: str | None = None
    role: str | None = None
    limits: Limit | None = None


class RateLimits(_Strict):
    """`per_key` applies to every key without its own `limits` (anonymous clients share one);
    `deployments` are the provider's limits, which selection routes around."""

    per_key: Limit | None = None
    models: dict[str, Limit] = {}
    deployments: dict[str, Limit] = {}


class BudgetAction(_Strict):
    at_percent: float = Field(gt=0, le=10_000)
    action: Literal["notify", "downgrade", "block"]
    to: str | None = None  # downgrade: the cheaper public model
    webhook: str | None = None  # notify: POSTed a JSON event once per period

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class Budget(_Strict):
    """A spend limit over a period for one scope: `match` names one key/team/user/model;
    without it, each key (team, user, model) gets its own budget of `limit_usd`."""

    name: str
    scope: Literal["key", "team", "user", "model", "global"]
    match: str | None = None
    limit_usd: float = Field(gt=0)
    period: Literal["day", "month", "rolling"] = "month"
    window_hours: float | None = Field(None, gt=0, le=24 * 366)  # for period: rolling
    utc_offset_minutes: int = Field(0, ge=-14 * 60, le=14 * 60)  # where calendar periods start
    actions: list[BudgetAction] = [BudgetAction(at_percent=100, action="block")]


class Budgets(_Strict):
    # Completion tokens reserved when a request sets no max_tokens (and the cap when it sets more).
    reserve_max_tokens: int = Field(4096, ge=1)
    limits: list[Budget] = []


class SharedState(_Strict):
    """Redis for budgets, reservations and rate-limit counters shared by several instances."""

    redis_url: str
    on_unavailable: Literal["open", "closed"] = "open"
    timeout_ms: int = Field(200, ge=1)
    prefix: str = "edgeroute"


class Ledger(_Strict):
    """Where spend is written: one row per request, batched off the request path."""

    backend: Literal["sqlite", "postgres", "memory"] = "sqlite"
    path: str = "edgeroute-ledger.db"  # sqlite
    dsn: str | None = None  # postgres, a secret reference (env:/file:/literal)
    flush_interval: float = Field(0.5, gt=0, le=1.0)
    record_attempts: bool = True


class Feedback(_Strict):
    max_shift: float = Field(0.15, ge=0, le=1)
    cost_weight: float = Field(0.0, ge=0)
    state_path: str | None = None


class Learning(_Strict):
    """Learned routing models (`builtin`: the ones shipped with edgeroute) and feedback learning."""

    task_model: str = "builtin"
    router_model: str = "builtin"
    feedback: Feedback | None = None
    shadow_log: str | None = None


class Config(_Strict):
    server: Server = Server()
    providers: dict[str, Provider]
    deployments: dict[str, Deployment]
    models: dict[str, Model]
    rules: list[Rule] = []
    retry: Retry = Retry()
    retry_budget: RetryBudget = RetryBudget()
    health: HealthSettings = HealthSettings()
    keys: dict[str, VirtualKey] = {}
    rate_limits: RateLimits = RateLimits()
    budgets: Budgets = Budgets()
    ledger: Ledger | None = None
    shared_state: SharedState | None = None
    learning: Learning = Learning()

    def core_json(self) -> bytes:
        """The config in the Rust core's `RouterSpec` form."""
        deps = []
        for name, d in self.deployments.items():
            spec: dict[str, Any] = {
                "name": name,
                "provider": d.provider,
                "model": d.model,
                "weight": d.weight,
                "input_per_mtok": d.price.input_per_mtok,
                "output_per_mtok": d.price.output_per_mtok,
                "context_window": d.context_window,
                "tags": d.tags,
            }
            if d.encoding:
                spec["encoding"] = d.encoding
            deps.append(spec)
        models = []
        for name, m in self.models.items():
            spec = {
                "name": name,
                "deployments": m.deployments,
                "strategy": m.strategy,
                "fallbacks": m.fallbacks,
                "context_window_fallbacks": m.context_window_fallbacks,
                "hedge": m.hedge.model_dump() if m.hedge else None,
            }
            if m.policy is not None:
                spec["policy"] = m.policy.model_dump()
            if m.experiment is not None:
                spec["experiment"] = {"name": name, **m.experiment.model_dump()}
            models.append(spec)
        return orjson.dumps(
            {
                "deployments": deps,
                "models": models,
                "rules": [r.model_dump(exclude_none=True) for r in self.rules],
                "retry_budget": self.retry_budget.model_dump(),
                "health": self.health.model_dump(),
            }
        )


class ConfigError(Exception):
    """The config is invalid; `errors` holds one line per problem, each naming file and path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _cross_check(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, d in cfg.deployments.items():
        if d.provider not in cfg.providers:
            problems.append((f"deployments.{name}.provider", f"unknown provider {d.provider!r}"))
    for name, m in cfg.models.items():
        choosers = [f for f in ("policy", "experiment") if getattr(m, f) is not None]
        if not m.deployments and not choosers:
            problems.append((f"models.{name}.deployments", "a model needs deployments, a policy or an experiment"))
        if m.deployments and choosers:
            problems.append((f"models.{name}.{choosers[0]}", "a model with a policy or experiment has no deployments"))
        if len(choosers) == 2:
            problems.append((f"models.{name}.experiment", "use either a policy or an experiment"))
        refs: list[tuple[str, str]] = []
        if m.policy is not None:
            refs += [
                (f"models.{name}.policy.candidates[{i}].route", c.route) for i, c in enumerate(m.policy.candidates)
            ]
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
                problems.append((path, f"unknown model {ref!r}"))
            elif not target.deployments and not policy_ok:
                problems.append((path, f"{ref!r} must be a model with deployments"))
        for i, dep in enumerate(m.deployments):
            if dep not in cfg.deployments:
                problems.append((f"models.{name}.deployments[{i}]", f"unknown deployment {dep!r}"))
        lists = [("fallbacks", m.fallbacks), ("context_window_fallbacks", m.context_window_fallbacks)]
        lists += [(f"fallbacks_on.{cls}", names) for cls, names in m.fallbacks_on.items()]
        for field, names in lists:
            for i, f in enumerate(names):
                if f not in cfg.models:
                    problems.append((f"models.{name}.{field}[{i}]", f"unknown model {f!r}"))
                elif f == name:
                    problems.append((f"models.{name}.{field}[{i}]", "a model cannot fall back to itself"))
    seen: set[str] = set()
    for i, r in enumerate(cfg.rules):
        if r.name in seen:
            problems.append((f"rules[{i}].name", f"rule name {r.name!r} is used twice"))
        seen.add(r.name)
        if r.then.route is not None and r.then.route not in cfg.models:
            problems.append((f"rules[{i}].then.route", f"unknown model {r.then.route!r}"))
        for j, dep in enumerate(r.then.deployments):
            if dep not in cfg.deployments:
                problems.append((f"rules[{i}].then.deployments[{j}]", f"unknown deployment {dep!r}"))
    problems += _cross_check_cost(cfg)
    for i, ref in enumerate(cfg.server.api_keys):
        try:
            secrets.resolve(ref)
        except secrets.SecretError as e:
            problems.append((f"server.api_keys[{i}]", str(e)))
    for name, p in cfg.providers.items():
        if p.api_key is not None:
            try:
                secrets.resolve(p.api_key)
            except secrets.SecretError as e:
                problems.append((f"providers.{name}.api_key", str(e)))
        if p.tls is not None:
            problems += _check_tls(f"providers.{name}.tls", p.tls)
    return problems


def _check_tls(where: str, tls: Tls) -> list[tuple[str, str]]:
    files = {"ca_bundle": tls.ca_bundle, "client_cert": tls.client_cert, "client_key": tls.client_key}
    missing = [
        (f"{where}.{field}", f"no readable file at {path}")
        for field, path in files.items()
        if path is not None and not Path(path).expanduser().is_file()
    ]
    if missing:
        return missing
    if tls.client_key is not None and tls.client_cert is None:
        return [(f"{where}.client_key", "a client_key needs a client_cert")]
    try:
        tls_context(tls.ca_bundle, tls.client_cert, tls.client_key)
    except (OSError, ssl.SSLError) as e:
        return [(where, f"cannot load the certificates: {e}")]
    return []


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
        if (other := owner_of.setdefault(digest.lower(), name)) != name:
            problems.append((f"keys.{name}", f"has the same token as keys.{other}"))
    for section, names, known in (
        ("models", cfg.rate_limits.models, cfg.models),
        ("deployments", cfg.rate_limits.deployments, cfg.deployments),
    ):
        for n in names:
            if n not in known:
                problems.append((f"rate_limits.{section}.{n}", f"unknown {section[:-1]} {n!r}"))
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
            problems.append((f"{where}.match", f"unknown model {b.match!r}"))
        if b.scope == "key" and b.match is not None and b.match not in cfg.keys:
            problems.append((f"{where}.match", f"unknown key {b.match!r}"))
        for j, a in enumerate(b.actions):
            if a.action == "downgrade":
                if a.to is None:
                    problems.append((f"{where}.actions[{j}].to", "downgrade needs a target model"))
                elif a.to not in cfg.models:
                    problems.append((f"{where}.actions[{j}].to", f"unknown model {a.to!r}"))
            elif a.to is not None:
                problems.append((f"{where}.actions[{j}].to", "only downgrade takes a target"))
    if cfg.ledger is not None and cfg.ledger.backend == "postgres" and not cfg.ledger.dsn:
        problems.append(("ledger.dsn", "the postgres backend needs a dsn"))
    refs = [(f"keys.{n}.token", k.token) for n, k in cfg.keys.items() if k.token is not None]
    if cfg.ledger is not None and cfg.ledger.dsn is not None:
        refs.append(("ledger.dsn", cfg.ledger.dsn))
    for where, ref in refs:
        try:
            secrets.resolve(ref)
        except secrets.SecretError as e:
            problems.append((where, str(e)))
    return problems


def parse(data: Any, source: str = "<config>", *, check_secrets: bool = True) -> Config:
    """Validates already-loaded YAML data; raises :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: (top level): expected a mapping, got {type(data).__name__}"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {_path(err['loc'])}: {msg}")
        raise ConfigError(lines) from None
    problems = _cross_check(cfg)
    if not check_secrets:
        secret_paths = (".api_key", ".token", "ledger.dsn")
        problems = [p for p in problems if not (p[0].endswith(secret_paths) or p[0].startswith("server.api_keys"))]
    if problems:
        raise ConfigError([f"{source}: {path}: {msg}" for path, msg in problems])
    # The core compiles regexes and checks what Python cannot (e.g. time formats).
    from edgeroute import _core, routing_models

    task, router = routing_models.load(cfg, source)
    try:
        _core.Router(cfg.core_json(), task, router)
    except _core.ConfigError as e:
        raise ConfigError([f"{source}: {e}"]) from None
    return cfg


def load(path: str | Path, *, check_secrets: bool = True) -> Config:
    """Reads and validates a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{p}: {where}invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return parse(data, str(p), check_secrets=check_secrets)
