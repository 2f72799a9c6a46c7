"""The YAML config: schema, validation with precise errors, and the core's view of it.

A config declares providers (where and how to call), deployments (a model at a
provider, with prices, context window, weight and tags), public models (what clients
ask for, mapped to deployments) and rules. Validation is strict: an unknown key is an
error, and every error names the file, the path inside it and what is wrong.

This module owns the schema only; it does no I/O beyond reading the file and
resolving secret references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeroute import secrets

ProviderKind = Literal["openai", "openai_compatible", "azure", "anthropic", "gemini", "bedrock"]
Strategy = Literal["weighted", "p2c_ewma", "lowest_cost", "least_busy"]


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


class Provider(_Strict):
    kind: ProviderKind = "openai"
    base_url: str
    api_key: str | None = None
    max_connections: int = Field(256, ge=1)
    timeouts: Timeouts = Timeouts()
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


class Price(_Strict):
    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)


class Deployment(_Strict):
    provider: str
    model: str
    price: Price = Price()
    context_window: int = Field(0, ge=0)
    weight: int = Field(1, ge=0)
    tags: list[str] = []
    encoding: Literal["o200k_base", "cl100k_base", "claude_estimate", "gemini_estimate"] | None = None


class Hedge(_Strict):
    percentile: float = Field(95.0, gt=0, lt=100)
    delay_ms: float | None = Field(None, gt=0)
    min_delay_ms: float = Field(50.0, ge=0)
    budget_percent: float = Field(5.0, ge=0, le=100)
    min_samples: int = Field(20, ge=1)


class Model(_Strict):
    deployments: list[str] = Field(min_length=1)
    strategy: Strategy = "weighted"
    fallbacks: list[str] = []
    context_window_fallbacks: list[str] = []
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


class Config(_Strict):
    server: Server = Server()
    providers: dict[str, Provider]
    deployments: dict[str, Deployment]
    models: dict[str, Model]
    rules: list[Rule] = []
    retry: Retry = Retry()
    retry_budget: RetryBudget = RetryBudget()
    health: HealthSettings = HealthSettings()

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
            models.append(
                {
                    "name": name,
                    "deployments": m.deployments,
                    "strategy": m.strategy,
                    "fallbacks": m.fallbacks,
                    "context_window_fallbacks": m.context_window_fallbacks,
                    "hedge": m.hedge.model_dump() if m.hedge else None,
                }
            )
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
        for i, dep in enumerate(m.deployments):
            if dep not in cfg.deployments:
                problems.append((f"models.{name}.deployments[{i}]", f"unknown deployment {dep!r}"))
        for field in ("fallbacks", "context_window_fallbacks"):
            for i, f in enumerate(getattr(m, field)):
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
    for name, p in cfg.providers.items():
        if p.api_key is not None:
            try:
                secrets.resolve(p.api_key)
            except secrets.SecretError as e:
                problems.append((f"providers.{name}.api_key", str(e)))
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
        problems = [p for p in problems if not p[0].endswith(".api_key")]
    if problems:
        raise ConfigError([f"{source}: {path}: {msg}" for path, msg in problems])
    # The core compiles regexes and checks what Python cannot (e.g. time formats).
    from edgeroute import _core

    try:
        _core.Router(cfg.core_json())
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
